"""GGUF interop: import a llama-architecture GGUF file (as llama.cpp writes them) into a checkpoint, and
export a checkpoint back to one.

Reading, dequantizing, quantizing and writing go through the `gguf` package (`pip install tinylm[gguf]`).
llama.cpp stores the query and key projections with the rows of each head reordered (its RoPE rotates
adjacent pairs, Hugging Face's rotates the two halves), so import undoes that order and export applies it.
The tokenizer is rebuilt from the file's metadata as a `tokenizers` byte-level BPE, the way transformers'
GGUF loader builds it, and the chat template comes from `tokenizer.chat_template`. Dequantized weights are
not the original ones: the checkpoint records the file's tensor types, and `tinylm info` shows them.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from tinylm.errors import UserError
from tinylm.model import ModelShape

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q2_K",
                   "Q3_K")
"""Tensor types imported; `gguf.quants` dequantizes each of them in numpy."""
EXPORT_TYPES = ("F32", "F16", "Q8_0")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_IGNORED = ("rope_freqs.weight",)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF files need the gguf package: pip install 'tinylm[gguf]'") from None
    return gguf


def tinylm_name(gguf_name: str) -> str | None:
    """The checkpoint's parameter name for a GGUF tensor name, None for one tinylm has no use for."""
    stem, _, kind = gguf_name.rpartition(".")
    if gguf_name in _IGNORED or kind not in ("weight",):
        return None
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def gguf_name(name: str) -> str:
    """The GGUF tensor name of a checkpoint parameter."""
    top = {f"{v}.weight": f"{k}.weight" for k, v in _TOP_NAMES.items()}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)
    back = {f"{v}.weight": k for k, v in _LAYER_NAMES.items()}
    return f"blk.{i}.{back[rest]}.weight"


def llama_cpp_order(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from the half-split RoPE layout to llama.cpp's interleaved one."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_order(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `llama_cpp_order`."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """The metadata and tensors of a GGUF file, every failure to read it a `UserError` naming the file."""

    def __init__(self, path: str | os.PathLike):
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"file not found: {self.path}")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, KeyError, IndexError, OSError, EOFError, UnicodeDecodeError, OverflowError) as e:
            raise UserError(f"{self.path} is truncated or not a GGUF file ({type(e).__name__}: {e})") from None
        self.fields = {}
        for name, f in self.reader.fields.items():
            try:
                self.fields[name] = f.contents()
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                raise UserError(f"{self.path}: metadata {name} is damaged ({e})") from None

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def need(self, key: str):
        if key not in self.fields:
            raise UserError(f"{self.path}: metadata {key} is missing")
        return self.fields[key]

    def tensor_types(self) -> dict[str, int]:
        return dict(Counter(t.tensor_type.name for t in self.reader.tensors))

    def tensors(self):
        """(name, float32 array in numpy's row-major order) for every tensor."""
        gguf = _gguf()
        for t in self.reader.tensors:
            kind = t.tensor_type.name
            if kind not in SUPPORTED_TYPES:
                raise UserError(f"{self.path}: tensor {t.name} has quantization type {kind}, which tinylm does "
                                f"not import (supported: {', '.join(SUPPORTED_TYPES)})")
            try:
                values = gguf.quants.dequantize(t.data, t.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise UserError(f"{self.path}: tensor {t.name} ({kind}) cannot be dequantized: {e}") from None
            shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-moving axis first
            yield t.name, np.asarray(values, dtype=np.float32).reshape(shape)


def shape_of(f: GGUFFile) -> ModelShape:
    arch = f.need("general.architecture")
    if arch != "llama":
        raise UserError(f"{f.path}: architecture {arch!r} is not supported (tinylm imports llama GGUF files)")
    scaling = f.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or f.get("llama.expert_count"):
        raise UserError(f"{f.path}: unsupported llama variant (rope scaling {scaling!r} or experts)")

    def size(key: str, default=None) -> int:
        value = f.get(f"llama.{key}", default)
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{f.path}: metadata llama.{key} must be a positive integer, not {value!r}")
        return value

    dim, heads = size("embedding_length"), size("attention.head_count")
    if dim % heads or size("rope.dimension_count", dim // heads) != dim // heads:
        raise UserError(f"{f.path}: unsupported llama variant (head size is not embedding_length / head_count)")
    vocab = f.get("llama.vocab_size") or len(f.need("tokenizer.ggml.tokens"))

    def f32(key: str, default: float) -> float:  # stored as float32: 1e-5 reads 9.99999974e-06 otherwise
        return float(f"{float(f.get(key, default)):.7g}")

    return ModelShape(n_layers=size("block_count"), dim=dim, n_heads=heads,
                      n_kv_heads=size("attention.head_count_kv", heads), ffn_dim=size("feed_forward_length"),
                      vocab_size=int(vocab), rope_theta=f32("llama.rope.freq_base", 10000.0),
                      max_seq_len=size("context_length", 2048), tie_embeddings=True,
                      norm_eps=f32("llama.attention.layer_norm_rms_epsilon", 1e-5))


def read_params(f: GGUFFile, shape: ModelShape) -> tuple[dict[str, np.ndarray], ModelShape]:
    import dataclasses

    params = {}
    for name, value in f.tensors():
        ours = tinylm_name(name)
        if ours is None:
            if name in _IGNORED:
                continue
            raise UserError(f"{f.path}: tensor {name} has no place in a llama model")
        if ours.endswith("q_proj.weight"):
            value = hf_order(value, shape.n_heads)
        elif ours.endswith("k_proj.weight"):
            value = hf_order(value, shape.n_kv_heads)
        params[ours] = value
    untied = "lm_head.weight" in params and not np.array_equal(params["lm_head.weight"],
                                                               params.get("embed_tokens.weight"))
    if not untied:
        params.pop("lm_head.weight", None)
    return params, dataclasses.replace(shape, tie_embeddings=not untied)


def import_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Read a llama GGUF file into a tinylm checkpoint (step 0) under `out_dir`, dequantized to float32."""
    from tinylm.interop.hf import prepare_import, save_imported
    from tinylm.interop.gguf_tokenizer import build_tokenizer, tokenizer_config

    out_dir = Path(out_dir)
    prepare_import(out_dir, force)
    f = GGUFFile(path)
    shape = shape_of(f)
    tok = build_tokenizer(f)
    tok_cfg = tokenizer_config(f, tok)
    if tok_cfg.get("chat_template"):  # before the slow part: dequantizing every tensor
        from tinylm.generate import check_chat_template

        check_chat_template({"hf_tokenizer_config": tok_cfg, "add_bos": False})
    params, shape = read_params(f, shape)
    from tinylm.train import checkpoint

    checkpoint.check_params(shape, params, str(f.path))
    source = {"format": "gguf", "architecture": "llama", "name": f.get("general.name") or f.path.name,
              "file": f.path.name, "quantization": f.tensor_types(), "tokenizer_pre": f.get("tokenizer.ggml.pre")}
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        tok.save(str(tok_path))
        return save_imported(out_dir, shape, params, tok_path, tok_cfg, {}, {}, source)


def _token_table(tok_json: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order with their GGUF types, and the merges, from a byte-level BPE tokenizer.json."""
    from tinylm.interop.gguf_tokenizer import CONTROL, USER_DEFINED

    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json_text(tok_json.get("pre_tokenizer")):
        raise UserError("GGUF export writes byte-level BPE tokenizers only (this checkpoint's is "
                        f"{model.get('type')} with pre-tokenizer {json_text(tok_json.get('pre_tokenizer'))[:60]})")
    tokens = [f"<unused_{i}>" for i in range(vocab_size)]
    types = [1] * vocab_size  # NORMAL
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = token
    for added in tok_json.get("added_tokens") or []:
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges


def _pre_tokenizer_name(tok_json: dict, source: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the checkpoint's pre-tokenizer: the source file's own where
    the checkpoint came from a GGUF file, else the one whose splits are the tokenizer's. llama.cpp reads only
    the name and splits text with its own built-in rules for it."""
    from tinylm.interop.gguf_tokenizer import _LLAMA3_SPLIT

    if source.get("tokenizer_pre"):
        return str(source["tokenizer_pre"])
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # single digits, then GPT-2's splits: SmolLM's tokenizer, and tinylm's own
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    print(f"note: llama.cpp knows no pre-tokenizer with this checkpoint's splits ({json_text(pre)[:80]}); "
          f"the file names its default, and llama.cpp may split text differently from tinylm", file=sys.stderr)
    return "default"


def json_text(value) -> str:
    import json

    return json.dumps(value)


def export_gguf(ckpt_path: str | os.PathLike, out_file: str | os.PathLike, dtype: str = "F16",
                force: bool = False) -> Path:
    """Write a checkpoint as a llama GGUF file that llama.cpp and transformers' GGUF loader read: matrices in
    `dtype` (F32, F16 or Q8_0), norms in F32. Written to a temporary file first, then renamed."""
    import json

    from tinylm.generate import load_checkpoint_tokenizer, special_ids
    from tinylm.interop.hf import _hf_tensors
    from tinylm.train import checkpoint

    gguf = _gguf()
    if dtype not in EXPORT_TYPES:
        raise UserError(f"unknown GGUF tensor type {dtype!r} (export writes {', '.join(EXPORT_TYPES)})")
    out = Path(out_file)
    if out.exists() and (out.is_dir() or not force):
        raise UserError(f"{out} exists; choose another file or pass --force to replace it")
    ckpt = checkpoint.load(ckpt_path, with_optimizer=False)
    shape = ckpt.shape
    if shape.qk_norm:
        raise UserError(f"{ckpt.path}: a model with QK-norm has no llama GGUF form; export it --to hf")
    tok = load_checkpoint_tokenizer(ckpt)
    tok_json = json.loads(tok.to_str())
    tokens, types, merges = _token_table(tok_json, shape.vocab_size)
    meta, ids = ckpt.meta, special_ids(tok, ckpt.meta)
    original = meta.get("hf_tokenizer_config") or {}
    source = meta.get("imported_from") or {}

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(str(source.get("name") or ckpt.path.parent.parent.name))
    depth = shape.n_layers * shape.block_repeats
    w.add_block_count(depth)
    w.add_context_length(shape.max_seq_len)
    w.add_embedding_length(shape.dim)
    w.add_feed_forward_length(shape.ffn_dim)
    w.add_head_count(shape.n_heads)
    w.add_head_count_kv(shape.n_kv_heads)
    w.add_rope_dimension_count(shape.dim // shape.n_heads)
    w.add_rope_freq_base(float(shape.rope_theta))
    w.add_layer_norm_rms_eps(float(shape.norm_eps))
    w.add_vocab_size(shape.vocab_size)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(tok_json, source))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    names = {"bos": original.get("bos_token"), "eos": original.get("eos_token"), "pad": original.get("pad_token")}
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        name = names[key].get("content") if isinstance(names[key], dict) else names[key]
        i = tok.token_to_id(name) if name else ids[key]
        if i is not None:
            add(i)
    w.add_add_bos_token(bool(meta.get("add_bos", True)) and ids["bos"] is not None)
    template = original.get("chat_template")
    if template is None:
        from tinylm.generate import CHAT_TEMPLATE

        template = CHAT_TEMPLATE
    w.add_chat_template(template)
    for name, value in _hf_tensors(shape, ckpt.params).items():
        ours = name.removeprefix("model.")
        if ours.endswith("q_proj.weight"):
            value = llama_cpp_order(value, shape.n_heads)
        elif ours.endswith("k_proj.weight"):
            value = llama_cpp_order(value, shape.n_kv_heads)
        if value.ndim == 1 or dtype == "F32":
            w.add_tensor(gguf_name(ours), value.astype(np.float32))
        elif dtype == "F16":
            w.add_tensor(gguf_name(ours), value.astype(np.float16))
        else:
            if value.shape[-1] % 32:
                raise UserError(f"Q8_0 needs rows of a multiple of 32 values; {ours} has {value.shape[-1]}")
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name(ours), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return out
