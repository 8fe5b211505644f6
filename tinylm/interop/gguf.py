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
    return ModelShape(n_layers=size("block_count"), dim=dim, n_heads=heads,
                      n_kv_heads=size("attention.head_count_kv", heads), ffn_dim=size("feed_forward_length"),
                      vocab_size=int(vocab), rope_theta=float(f.get("llama.rope.freq_base", 10000.0)),
                      max_seq_len=size("context_length", 2048), tie_embeddings=True,
                      norm_eps=float(f.get("llama.attention.layer_norm_rms_epsilon", 1e-5)))


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
    params, shape = read_params(f, shape)
    from tinylm.train import checkpoint

    checkpoint.check_params(shape, params, str(f.path))
    source = {"format": "gguf", "architecture": "llama", "name": f.get("general.name") or f.path.name,
              "file": f.path.name, "quantization": f.tensor_types()}
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        tok.save(str(tok_path))
        return save_imported(out_dir, shape, params, tok_path, tok_cfg, {}, {}, source)
