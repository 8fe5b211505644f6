"""`make bench`'s real-model rows on SmolLM2-135M's shape: training against transformers' plain loop, and the
peak memory of one SFT step and one GRPO step.

Speed and memory need only the shape, so every row runs on random weights of it (`generation.SHAPE`) and the
real model need not be here. The training rows run both sides interleaved in one process, each in every dtype it
offers on the machine, and compare each side's best: a user of either picks the faster dtype. transformers' side
is trained the obvious way: `LlamaForCausalLM(labels=...)`, `backward`, fused `torch.optim.AdamW`, under
`torch.autocast` for bf16. The memory rows run each step in a fresh process, since a process's peak only grows.
"""

from __future__ import annotations

import time

import numpy as np

from tinylm import model
from tinylm.bench.generation import SHAPE, _transformers_model
from tinylm.bench.memory import in_fresh_process, peak_memory_mb
from tinylm.model import ModelConfig, resolve

TRAIN_SHAPES = ((2, 256), (4, 512))
"""(batch, sequence length) of the training rows: the issue's two cases."""
DTYPES = ("float32", "bfloat16")


def _transformers_steps(hf, rows: np.ndarray, dtype: str, steps: int, warmup: int) -> tuple[float, list[float]]:
    """Seconds of `steps` timed optimizer steps of transformers' Llama on `rows` (after `warmup`), and losses."""
    import torch

    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    ids = torch.from_numpy(rows)
    elapsed, losses = 0.0, []
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = hf(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step >= warmup:
            elapsed += time.perf_counter() - t0
    return elapsed, losses


def training_rows(backend, shapes=TRAIN_SHAPES, steps: int = 2, warmup: int = 1, dtypes=DTYPES,
                  config: ModelConfig = SHAPE, echo=print) -> list[dict]:
    """A row per (batch, seq_len): tokens/s of tinylm's `TrainModule` and of transformers' loop in each dtype,
    each side's best, and `ratio` (tinylm's best over transformers' best). transformers is reset to the same
    starting weights before each of its dtypes, as tinylm's `train_throughput` starts afresh."""
    from tinylm.bench.suite import train_throughput

    shape = resolve(config)
    params = model.init_params(shape, 0)
    rows = []
    for batch, seq_len in shapes:
        tokens = np.random.default_rng(0).integers(0, shape.vocab_size, (batch, seq_len))
        ours, theirs = {}, {}
        for dtype in dtypes:  # interleaved: tinylm, then transformers, per dtype
            _, tps, losses = train_throughput(backend, config, seq_len, batch, steps, dtype, warmup)
            ours[dtype] = (round(tps, 1), [round(v, 4) for v in losses])
            seconds, losses = _transformers_steps(_transformers_model(shape, params), tokens, dtype, steps, warmup)
            theirs[dtype] = (round(steps * batch * seq_len / seconds, 1), [round(v, 4) for v in losses])
        best_ours = max(ours, key=lambda d: ours[d][0])
        best_theirs = max(theirs, key=lambda d: theirs[d][0])
        row = {"name": "train-135m-shape", "backend": backend.name, "device": backend.device_name,
               "batch_size": batch, "seq_len": seq_len,
               "tinylm": {d: {"tokens_per_s": v[0], "losses": v[1]} for d, v in ours.items()},
               "transformers": {d: {"tokens_per_s": v[0], "losses": v[1]} for d, v in theirs.items()},
               "best": {"tinylm": best_ours, "transformers": best_theirs},
               "ratio": round(ours[best_ours][0] / theirs[best_theirs][0], 3)}
        rows.append(row)
        echo(f"  train 135m-shape {batch} x {seq_len}: tinylm {best_ours} {ours[best_ours][0]:,.1f} tok/s vs "
             f"transformers {best_theirs} {theirs[best_theirs][0]:,.1f} tok/s ({row['ratio']:.2f}x)")
    return rows


def step_memory(kind: str, backend_name: str, dtype: str = "bfloat16", config: dict | None = None,
                batch_size: int = 4, seq_len: int = 512, prompts: int = 8, group: int = 8, prompt_len: int = 64,
                new_tokens: int = 128, loss_chunk: int = 0,
                checkpoint_blocks: bool = False, grad_accum: int = 1) -> dict:
    """Peak memory of one optimizer step of `kind` as a `bench.json` row, in this process (call it in a fresh
    one: `memory_rows` does). `sft`: a packed batch (batch_size, seq_len) with the `sft` objective. `grpo`:
    `prompts` x `group` completions of `new_tokens` sampled as `tinylm.post.rl` samples them (one prefill per
    prompt, decoding in `dtype`), then one step of the `grpo` objective on the packed rollouts. `loss_chunk`:
    as `train.loss_chunk`, the output head and its loss in chunks of that many tokens (0: whole logits);
    `checkpoint_blocks`: as `train.checkpoint_blocks`, each block recomputed in the backward pass;
    `grad_accum`: as `train.grad_accum`, the step's rows in that many micro-batches, weighted as the RL and
    SFT feeds weight them."""
    from tinylm.backends import get_backend
    from tinylm.train import objectives
    from tinylm.train.optim import OptimConfig
    from tinylm.train.step import TrainModule

    backend = get_backend(backend_name, "float32")
    cfg = ModelConfig(**config) if config else SHAPE
    shape = resolve(cfg)
    rng = np.random.default_rng(0)
    params = backend.from_numpy(model.init_params(shape, 0))
    compute = model.Compute(dtype, loss_chunk=loss_chunk, checkpoint_blocks=checkpoint_blocks)
    t0 = time.perf_counter()
    if kind == "sft":
        module = TrainModule(backend, shape, OptimConfig(lr=1e-5), compute, objective=objectives.sft)
        tokens = rng.integers(0, shape.vocab_size, (batch_size, seq_len + 1))
        weights = np.zeros((batch_size, seq_len), np.float32)
        weights[:, seq_len // 2:] = 1.0 / (batch_size * (seq_len - seq_len // 2))  # the assistant's half
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
        sizes = {"batch_size": batch_size, "seq_len": seq_len}
    elif kind == "grpo":
        from tinylm.generate import Model, SamplingConfig, generate_ids
        from tinylm.post.rl import GroupedPrefill, pack_rollouts, token_weights

        class Ids:  # the rollouts need token ids only
            def decode(self, ids, skip_special_tokens=False):
                return ""

        module = TrainModule(backend, shape, OptimConfig(lr=1e-6), compute, objective=objectives.grpo(0.2, 0.28, 0.0))
        prompt_ids = [rng.integers(1, shape.vocab_size, prompt_len).tolist() for _ in range(prompts)]
        lm = GroupedPrefill(Model(backend, shape, params, dtype), group)
        batch_ids = [ids for ids in prompt_ids for _ in range(group)]
        outs = generate_ids(lm, Ids(), batch_ids, SamplingConfig(max_tokens=new_tokens, temperature=1.0, seed=0))
        time_len = prompt_len + new_tokens
        tokens, mask, old = pack_rollouts(batch_ids, outs, prompt_len, time_len, 0)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "old_logprobs": old,
                 "advantages": rng.standard_normal((len(outs), 1)).repeat(time_len, 1).astype(np.float32),
                 "weights": token_weights(mask, "dapo", new_tokens).astype(np.float32)}
        del lm, outs  # as in `RLData.rollout`, the sampler and its caches are gone before the step
        sizes = {"prompts": prompts, "group": group, "prompt_len": prompt_len, "new_tokens": new_tokens}
    else:
        raise ValueError(f"unknown step kind {kind!r} (sft or grpo)")
    state = module.init_state(params)
    batch["weights"] = batch["weights"] * np.float32(grad_accum)
    micro = [{k: np.array_split(v, grad_accum)[i] for k, v in batch.items()} for i in range(grad_accum)]
    params, state, loss, _ = module.step(params, state, micro, 1e-6, 1)
    backend.sync()
    return {"name": f"{kind}-step-135m-shape-memory", "backend": backend.name, "device": backend.device_name,
            "dtype": dtype, "loss_chunk": loss_chunk, "checkpoint_blocks": checkpoint_blocks,
            "grad_accum": grad_accum,
            "peak_memory_mb": peak_memory_mb(backend),
            "losses": [round(loss, 5)],
            "seconds": round(time.perf_counter() - t0, 2), **sizes}


def memory_rows(backends=("torch",), kinds=("sft", "grpo"), echo=print, **sizes) -> list[dict]:
    """A row per backend and step kind, each measured in a fresh Python process."""
    out = []
    for name in backends:
        for kind in kinds:
            row = in_fresh_process(__name__, "step_memory", {"kind": kind, "backend_name": name, **sizes},
                                   f"{kind} memory case on {name}")
            out.append(row)
            echo(f"  {row['name']} {name} {row['dtype']}: peak {row['peak_memory_mb']:9,.1f} MiB  "
                 f"{row['seconds']:.1f} s")
    return out
