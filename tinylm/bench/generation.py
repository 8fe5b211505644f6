"""Batched greedy decoding with a KV cache: tinylm's `generate_ids` against transformers' `generate` on the
same weights, interleaved in one process.

The model is SmolLM2-135M's shape (the `mobilellm-125m` preset with a 49,152-token vocabulary) on random
weights: speed needs only the shape. Both sides decode the same random prompts for the same number of new
tokens (no stop token: transformers is held to it with `min_new_tokens`), and each side's best of `repeats`
counts, so that whichever ran first does not pay the other's warm-up. Rows run where transformers is
installed (the `dev` extra).
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np

from tinylm import model
from tinylm.model import ModelConfig, resolve

SHAPE = ModelConfig(preset="mobilellm-125m", vocab_size=49152)


class _Ids:
    """A tokenizer that decodes to nothing: the comparison is of token ids, as transformers' returns."""

    def decode(self, ids, skip_special_tokens=False):
        return ""


def _transformers_model(shape: model.ModelShape, params: dict):
    """A LlamaForCausalLM of `shape` holding `params` (as `tinylm export` writes them)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinylm.interop.hf import _config, _hf_tensors

    cfg = _config(shape, {"bos": None, "pad": 0}, [])
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "tinylm", "torch_dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in _hf_tensors(shape, params).items()},
                                             strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is the embedding itself
        raise RuntimeError(f"transformers' Llama does not take these weights: {missing} {unexpected}")
    return hf


def decode_rows(backend, batches=(8, 64), new_tokens: int = 128, prompt_len: int = 32, repeats: int = 2,
                dtypes=("float32",), peer_dtypes=("float32", "bfloat16"), config: ModelConfig = SHAPE,
                echo=print) -> list[dict]:
    """One row per batch size and tinylm dtype: generated tokens/s of each side, transformers' in each of
    `peer_dtypes` (its float32 default, and bf16 weights), the ratio to its float32 and to its best, and the
    share of greedy tokens on which the float32 sides agreed (the same argmax unless two logits nearly tie)."""
    import torch

    from tinylm.generate import Model, SamplingConfig, generate_ids

    shape = resolve(config)
    params = model.init_params(shape, 0)
    models = {d: Model(backend, shape, params, dtype=d) for d in dtypes}
    peers = {}
    if importlib.util.find_spec("transformers"):
        hf = _transformers_model(shape, params)
        peers = {d: hf if d == "float32" else _transformers_model(shape, params).to(getattr(torch, d))
                 for d in peer_dtypes}
    rng, rows = np.random.default_rng(0), []
    cfg = SamplingConfig(max_tokens=new_tokens)
    for batch in batches:
        prompts = rng.integers(1, shape.vocab_size, (batch, prompt_len))
        best = {name: float("inf") for name in (*models, *(f"transformers {d}" for d in peers))}
        ours = theirs = None
        for _ in range(repeats):  # interleaved, best of `repeats` each
            for dtype, lm in models.items():
                t0 = time.perf_counter()
                out = generate_ids(lm, _Ids(), prompts.tolist(), cfg)
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
                ours = ours if dtype != "float32" else np.array([o.tokens for o in out])
            for dtype, hf in peers.items():
                with torch.no_grad():
                    t0 = time.perf_counter()
                    ids = torch.from_numpy(prompts)
                    got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                    best[f"transformers {dtype}"] = min(best[f"transformers {dtype}"], time.perf_counter() - t0)
                if dtype == "float32":
                    theirs = got[:, prompt_len:].numpy()
        tokens = batch * new_tokens
        peer = {d: round(tokens / best[f"transformers {d}"], 1) for d in peers}
        peer_best = max(peer, key=peer.get) if peer else None
        for dtype in models:
            tps = tokens / best[dtype]
            row = {"name": "generate-135m-shape" if config == SHAPE else f"generate-{config.preset}",
                   "backend": backend.name, "device": backend.device_name,
                   "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "tokens_per_s": round(tps, 1),
                   "transformers_tokens_per_s": peer.get("float32"),
                   "ratio": round(tps / peer["float32"], 3) if "float32" in peer else None,
                   "transformers_by_dtype": peer, "transformers_best": peer_best,
                   "ratio_to_best": round(tps / peer[peer_best], 3) if peer else None}
            if dtype == "float32" and theirs is not None:
                row["same_greedy_tokens"] = round(float((ours == theirs).mean()), 4)
            rows.append(row)
            versus = "" if not peer else "".join(f" vs transformers {d} {v:,.1f} tok/s ({tps / v:.2f}x)"
                                                 for d, v in peer.items())
            echo(f"  decode {dtype} batch {batch} x {new_tokens} new tokens: {tps:,.1f} tok/s{versus}")
    return rows
