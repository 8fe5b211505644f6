"""Hugging Face interop: export a checkpoint as a `transformers` model directory, import one back.

tinylm's parameter names already follow the Llama layout, so export adds the `model.` prefix and writes a
config for an architecture `transformers` knows: LlamaForCausalLM, or Qwen3ForCausalLM when the model uses
QK-norm (Qwen3 normalizes each head's queries and keys before RoPE, as tinylm does). Block-wise sharing has no
equivalent there, so shared blocks are written out once per application; the config remembers the repeat
count, so importing the export folds them back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from tinylm.train import checkpoint
from tinylm.errors import UserError
from tinylm.files import staged_folder, write_failure
from tinylm.generate import BOS, CHAT_TEMPLATE, END, EOS, PAD, adds_bos, special_ids
from tinylm.model import ModelShape

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}

def _config(shape: ModelShape, ids: dict, eos_ids: list[int]) -> dict:
    arch = "Qwen3ForCausalLM" if shape.qk_norm else "LlamaForCausalLM"
    cfg = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.dim,
        "intermediate_size": shape.ffn_dim,
        "num_hidden_layers": shape.depth,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_seq_len,
        "initializer_range": shape.init_std,
        "rms_norm_eps": shape.norm_eps,
        "tie_word_embeddings": shape.tie_embeddings,
        # Older transformers read rope_theta, newer ones rope_parameters; both name the same plain RoPE.
        "rope_theta": shape.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos"],
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": ids["pad"],
        "use_cache": True,
        "torch_dtype": "float32",
        "tinylm": {"block_repeats": shape.block_repeats},
    }
    if arch == "LlamaForCausalLM":
        cfg.update(mlp_bias=False, pretraining_tp=1)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=shape.depth)
    return cfg


def _hf_tensors(shape: ModelShape, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {"model.embed_tokens.weight": params["embed_tokens.weight"], "model.norm.weight": params["norm.weight"]}
    if not shape.tie_embeddings:
        out["lm_head.weight"] = params["lm_head.weight"]
    for name, value in params.items():
        if not name.startswith("layers."):
            continue
        _, i, rest = name.split(".", 2)
        for r in range(shape.block_repeats):
            out[f"model.layers.{int(i) * shape.block_repeats + r}.{rest}"] = value
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _save_weights(tensors: dict[str, np.ndarray], path: Path) -> None:
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:  # as an OSError, so that the failure names the file (a full disk, say)
        raise OSError(None, write_failure(e), str(path)) from None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _read_json(path: Path, default=None):
    """A JSON file's value; `default` when it is absent; a `UserError` when it is damaged."""
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged (not JSON): {e}") from None


def check_target(out: Path, force: bool) -> None:
    """`out` may be written into: absent or empty, or `force` to write over what is there."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; choose another folder or pass --force to write into it")


def export_hf(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write a directory that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load (float32).
    A non-empty `out_dir` is refused unless `force`, which writes over the files of the same names. The files
    are written into a temporary folder first, so an interrupted or failed export leaves `out_dir` as it was."""
    out = Path(out_dir)
    check_target(out, force)
    with staged_folder(out) as folder:
        _write_hf(ckpt_path, folder)
    return out


def _write_hf(ckpt_path: str | os.PathLike, out: Path) -> None:
    from tokenizers import processors

    from tinylm.generate import load_checkpoint_tokenizer

    ckpt = checkpoint.load(ckpt_path, with_optimizer=False)
    tok = load_checkpoint_tokenizer(ckpt)
    meta = ckpt.meta
    ids = special_ids(tok, meta)
    names = {k: (tok.id_to_token(v) if v is not None else None) for k, v in ids.items()}
    eos_ids = [i for i in (ids["eos"], ids["end"]) if i is not None]

    _save_weights(_hf_tensors(ckpt.shape, ckpt.params), out / "model.safetensors")
    _write_json(out / "config.json", _config(ckpt.shape, ids, eos_ids))
    _write_json(out / "generation_config.json", {"bos_token_id": ids["bos"], "eos_token_id": eos_ids or None,
                                                 "pad_token_id": ids["pad"]})
    # transformers tokenizes with special tokens by default; tinylm documents start with BOS, so the exported
    # tokenizer adds it the way Llama's does and `tokenizer(text)` feeds the model what it was trained on.
    if tok.post_processor is None and names["bos"] and adds_bos(meta):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{names['bos']} $A", pair=f"{names['bos']} $A {names['bos']} $B",
            special_tokens=[(names["bos"], ids["bos"])])
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = dict(meta.get("hf_tokenizer_config") or {})
    tok_cfg.pop("added_tokens_decoder", None)
    tok_cfg.setdefault("chat_template", CHAT_TEMPLATE)
    tok_cfg.update({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": ckpt.shape.max_seq_len,
                    "clean_up_tokenization_spaces": False})
    for key in ("bos", "eos", "pad"):
        if names[key]:
            tok_cfg[f"{key}_token"] = names[key]
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "special_tokens_map.json", {f"{k}_token": names[k] for k in ("bos", "eos", "pad") if names[k]})


LFS_POINTER = b"version https://git-lfs"


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one file as float32, read with `safetensors`; bfloat16 ones (which numpy has no type
    for) through whichever of torch and MLX is installed."""
    try:
        with open(path, "rb") as f:
            if f.read(len(LFS_POINTER)) == LFS_POINTER:
                raise UserError(f"{path} is a git-lfs pointer, not the weights (fetch them with `git lfs pull`)")
        out = {}
        with safe_open(str(path), framework="numpy") as st:
            for name in st.keys():
                dtype = st.get_slice(name).get_dtype()
                out[name] = _bf16(path, name) if dtype == "BF16" else st.get_tensor(name).astype(np.float32)
        return out
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"{path} is missing (a shard the index names?)") from None
        raise UserError(f"{path} is not a safetensors file, or is truncated: {e}") from None


def _bf16(path: Path, name: str) -> np.ndarray:
    for framework in ("pt", "mlx"):
        try:
            with safe_open(str(path), framework=framework) as st:
                value = st.get_tensor(name)
        except (ImportError, ModuleNotFoundError):
            continue
        if framework == "pt":
            return value.float().numpy()
        import mlx.core as mx

        return np.array(value.astype(mx.float32))
    raise UserError(f"{path}: tensor {name} is bfloat16, which needs torch or mlx installed to read")


def _read_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    index = _read_json(hf_dir / "model.safetensors.index.json")
    if index is not None:
        try:
            files = sorted(set(index["weight_map"].values()))
        except (TypeError, KeyError, AttributeError):
            raise UserError(f"{hf_dir / 'model.safetensors.index.json'} has no weight_map of file names") from None
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{hf_dir} has no model.safetensors (only safetensors weights can be imported)")
    missing = [name for name in files if not (hf_dir / name).is_file()]
    if missing:
        raise UserError(f"{hf_dir}: shard {missing[0]} named by model.safetensors.index.json is missing "
                        f"({len(missing)} of {len(files)} shards absent)")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(hf_dir / name))
    return tensors


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_POSITIVE = ("rms_norm_eps", "rope_theta", "initializer_range")


def _check_numbers(cfg: dict, where: Path) -> None:
    """The sizes positive integers and the epsilons positive numbers where present, so that a damaged config
    is refused here rather than dividing by zero, or writing a checkpoint that does not load."""
    for key in _SIZES + tuple(k for k in _OPTIONAL_SIZES if cfg.get(k) is not None):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{where}: {key} must be a positive integer, not {value!r}")
    for key in (k for k in _OPTIONAL_POSITIVE if k in cfg):
        value = cfg[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise UserError(f"{where}: {key} must be a positive number, not {value!r}")


def _shape_from_config(cfg: dict, where: Path) -> tuple[str, ModelShape]:
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise UserError(f"{where}: architecture {arch!r} is not supported (tinylm imports {', '.join(ARCHITECTURES)})")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    problems = [
        cfg.get("hidden_act", "silu") != "silu" and f"hidden_act {cfg.get('hidden_act')}",
        cfg.get("attention_bias") and "attention biases",
        cfg.get("mlp_bias") and "MLP biases",
        rope.get("rope_type", rope.get("type", "default")) != "default" and f"rope type {rope.get('rope_type')}",
        cfg.get("use_sliding_window") and "sliding-window attention",
    ]
    _check_numbers(cfg, where / "config.json")
    heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    if cfg.get("head_dim", dim // heads) != dim // heads:
        problems.append(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    problems = [p for p in problems if p]
    if problems:
        raise UserError(f"{where}: unsupported {arch} variant ({'; '.join(problems)})")
    shape = ModelShape(
        n_layers=cfg["num_hidden_layers"], dim=dim, n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, ffn_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"], rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        max_seq_len=cfg.get("max_position_embeddings", 2048), tie_embeddings=bool(cfg.get("tie_word_embeddings")),
        qk_norm=arch == "Qwen3ForCausalLM", norm_eps=cfg.get("rms_norm_eps", 1e-6),
        init_std=cfg.get("initializer_range", 0.02))
    return arch, shape


def _fold_repeats(params: dict, n_layers: int, repeats: int) -> dict | None:
    """Undo the unrolling of shared blocks when every group of `repeats` layers is identical."""
    if repeats <= 1 or n_layers % repeats:
        return None
    folded = {}
    for name, value in params.items():
        if not name.startswith("layers."):
            folded[name] = value
            continue
        _, i, rest = name.split(".", 2)
        i = int(i)
        first = params[f"layers.{i - i % repeats}.{rest}"]
        if not np.array_equal(first, value):
            return None
        if i % repeats == 0:
            folded[f"layers.{i // repeats}.{rest}"] = value
    return folded


def prepare_import(out_dir: Path, force: bool) -> None:
    """Refuse an `out_dir` that an import must not write into, before any work."""
    check_target(out_dir, force)
    if (out_dir / "checkpoints" / "step_00000000").exists():
        raise UserError(f"{out_dir} already holds a step 0 checkpoint; choose another --out")


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Read a local Llama or Qwen3 model directory into a tinylm checkpoint (step 0) under `out_dir`.

    A non-empty `out_dir` is refused unless `force`; even then no checkpoint there is replaced or deleted."""
    import dataclasses

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    out_dir = Path(out_dir)
    prepare_import(out_dir, force)
    cfg = _read_json(hf_dir / "config.json")
    try:
        arch, shape = _shape_from_config(cfg, hf_dir)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{hf_dir / 'config.json'} is damaged or incomplete: {e!r}") from None
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json (tinylm needs the fast tokenizer file)")

    params = {k.removeprefix("model."): v for k, v in _read_weights(hf_dir).items()}
    params = {k: v for k, v in params.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in params:
        shape = dataclasses.replace(shape, tie_embeddings=True)
    elif shape.tie_embeddings:
        params.pop("lm_head.weight")
    repeats = int((cfg.get("tinylm") or {}).get("block_repeats", 1))
    folded = _fold_repeats(params, shape.n_layers, repeats)
    if folded is not None:
        params, shape = folded, dataclasses.replace(shape, n_layers=shape.n_layers // repeats, block_repeats=repeats)
    checkpoint.check_params(shape, params, str(hf_dir))
    tok_cfg = hf_tokenizer_config(hf_dir)
    gen = _read_json(hf_dir / "generation_config.json", {})
    return save_imported(out_dir, shape, params, hf_dir / "tokenizer.json", tok_cfg, cfg, gen,
                         {"format": "hf", "architecture": arch, "name": hf_dir.name})


def hf_tokenizer_config(hf_dir: Path) -> dict:
    """tokenizer_config.json with what transformers 5 keeps beside it: the special token names of
    special_tokens_map.json where the config has none, and the chat template of chat_template.jinja (which
    wins, as it does in transformers)."""
    tok_cfg = dict(_read_json(hf_dir / "tokenizer_config.json", {}) or {})
    for key, value in (_read_json(hf_dir / "special_tokens_map.json", {}) or {}).items():
        if key.endswith("_token") and tok_cfg.get(key) is None:
            tok_cfg[key] = _token_name(value)
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        tok_cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    elif (hf_dir / "chat_template.json").is_file():
        tok_cfg["chat_template"] = (_read_json(hf_dir / "chat_template.json") or {}).get("chat_template")
    return tok_cfg


def save_imported(out_dir: Path, shape: ModelShape, params: dict, tokenizer_path: Path, tok_cfg: dict,
                  cfg: dict, gen: dict, source: dict) -> Path:
    """The step 0 checkpoint of an imported model, with the special tokens tinylm decodes with.

    BOS is the token put before a document. A model whose tokenizer says it adds none, or whose named BOS
    is a chat turn marker (SmolLM2 names `<|im_start|>` its BOS, yet never adds it) records none, so that
    tinylm neither prepends it nor stops at it; the original names stay in `hf_tokenizer_config`, which
    export writes back."""
    from tinylm.data.tokenizer import load_tokenizer
    from tinylm.generate import check_chat_template

    tok = load_tokenizer(tokenizer_path)

    def name_of(key: str, fallback: str) -> str | None:
        value = _token_name(tok_cfg.get(f"{key}_token"))
        if value is None and isinstance(cfg.get(f"{key}_token_id"), int):
            value = tok.id_to_token(cfg[f"{key}_token_id"])
        if value is not None and tok.token_to_id(value) is None:
            value = None
        return value if value is not None else (fallback if tok.token_to_id(fallback) is not None else None)

    specials = {"bos": name_of("bos", BOS), "eos": name_of("eos", EOS), "pad": name_of("pad", PAD)}
    eos_ids = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    others = [tok.id_to_token(i) for i in eos_ids if isinstance(i, int) and tok.id_to_token(i) != specials["eos"]]
    specials["end"] = others[0] if others else (END if tok.token_to_id(END) is not None else None)
    bos_id = tok.token_to_id(specials["bos"]) if specials["bos"] else None
    probe = tok.encode("a").ids
    declared = tok_cfg.get("add_bos_token")
    add_bos = bool(bos_id is not None and probe and probe[0] == bos_id) or specials["bos"] == BOS or declared is True
    template = tok_cfg.get("chat_template")
    turn_marker = bool(specials["bos"] and isinstance(template, str) and specials["bos"] in template)
    if not add_bos and (declared is False or turn_marker):
        specials["bos"] = None
    meta = {"model": shape.to_dict(), "imported_from": source, "special_tokens": specials, "add_bos": add_bos,
            "hf_tokenizer_config": tok_cfg, "chat": bool(template)}
    if template:
        check_chat_template(meta)
    return checkpoint.save(out_dir, 0, params, None, meta, tokenizer=tokenizer_path, keep=0)
