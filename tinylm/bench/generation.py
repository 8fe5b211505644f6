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
                dtypes=("float32",), config: ModelConfig = SHAPE, echo=print) -> list[dict]:
    """One row per batch size and tinylm dtype: generated tokens/s of each side and their ratio, and the
    share of greedy tokens on which they agreed (float32 on both sides decodes the same argmax unless two
    logits nearly tie)."""
    import torch

    from tinylm.generate import Model, SamplingConfig, generate_ids

    shape = resolve(config)
    params = model.init_params(shape, 0)
    models = {d: Model(backend, shape, params, dtype=d) for d in dtypes}
    hf = _transformers_model(shape, params) if importlib.util.find_spec("transformers") else None
    rng, rows = np.random.default_rng(0), []
    cfg = SamplingConfig(max_tokens=new_tokens)
    for batch in batches:
        prompts = rng.integers(1, shape.vocab_size, (batch, prompt_len))
        best = {name: float("inf") for name in (*models, "transformers")}
        ours = theirs = None
        for _ in range(repeats):
            for dtype, lm in models.items():
                t0 = time.perf_counter()
                out = generate_ids(lm, _Ids(), prompts.tolist(), cfg)
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
                ours = ours if dtype != "float32" else np.array([o.tokens for o in out])
            if hf is not None:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    ids = torch.from_numpy(prompts)
                    got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                    best["transformers"] = min(best["transformers"], time.perf_counter() - t0)
                theirs = got[:, prompt_len:].numpy()
        tokens = batch * new_tokens
        peer = tokens / best["transformers"] if hf is not None else None
        for dtype in models:
            tps = tokens / best[dtype]
            row = {"name": "generate-135m-shape" if config == SHAPE else f"generate-{config.preset}", "backend": backend.name, "device": backend.device_name,
                   "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "tokens_per_s": round(tps, 1),
                   "transformers_tokens_per_s": None if peer is None else round(peer, 1),
                   "ratio": None if peer is None else round(tps / peer, 3)}
            if dtype == "float32" and theirs is not None:
                row["same_greedy_tokens"] = round(float((ours == theirs).mean()), 4)
            rows.append(row)
            versus = "" if peer is None else f" vs transformers {peer:,.1f} tok/s ({tps / peer:.2f}x)"
            echo(f"  decode {dtype} batch {batch} x {new_tokens} new tokens: {tps:,.1f} tok/s{versus}")
    return rows
