"""`tinylm bench`: training throughput and MFU per backend, measured against this machine's own matmul peak.

MFU needs a peak. On a device of the table in `tinylm.mfu` that is the data-sheet number; elsewhere (a CPU)
the peak is measured here as the best of several large matmuls in the benchmark's dtype, so the percentage
says how much of what this machine can do the training step achieves. Losses are printed next to the
speeds so that a faster configuration can be checked to compute the same thing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from tinylm import model
from tinylm.mfu import peak_flops
from tinylm.model import ModelConfig, resolve
from tinylm.optim import OptimConfig
from tinylm.train_module import TrainModule


def measured_matmul_peak(backend, sizes=(1024, 2048, 4096), repeats: int = 5) -> float:
    """Best FLOP/s of square float32 matmuls through the backend's own linear op, over a few sizes."""
    rng = np.random.default_rng(0)
    best = 0.0
    for n in sizes:
        arrays = backend.from_numpy({"a": rng.standard_normal((n, n), dtype=np.float32),
                                     "b": rng.standard_normal((n, n), dtype=np.float32)})
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            out = backend.ops.linear(arrays["a"], arrays["b"])
            backend.materialize(out)
            backend.sync()
            best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def train_throughput(backend, preset: str, seq_len: int, batch_size: int, steps: int, vocab_size: int = 32000):
    """tokens/s of full optimizer steps (after one warm-up step) and the losses of every step."""
    shape = resolve(ModelConfig(preset=preset, vocab_size=vocab_size))
    module = TrainModule(backend, shape, OptimConfig(lr=1e-3))
    params = backend.from_numpy(model.init_params(shape, 0))
    state = module.init_state(params)
    rows = np.random.default_rng(0).integers(0, shape.vocab_size, (batch_size, seq_len + 1))
    losses, elapsed = [], 0.0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        params, state, loss, _ = module.step(params, state, [rows], 1e-3, step + 1)
        backend.sync()
        if step:
            elapsed += time.perf_counter() - t0
        losses.append(loss)
    tokens_per_s = steps * batch_size * seq_len / elapsed
    return shape, tokens_per_s, losses


def rollout_throughput(backend, preset: str = "tiny", prompts: int = 8, group: int = 8, prompt_len: int = 64,
                       max_tokens: int = 64, vocab_size: int = 2048) -> dict:
    """RL rollouts (grouped prefill, sampling, then the log-probability pass the objective needs) against
    `tinylm generate`'s batched decoding of the same prompts, in generated tokens/s on the same model."""
    from tinylm.generate import Model, SamplingConfig, generate_ids
    from tinylm.rl import GroupedPrefill

    class Ids:  # decoding needs only token ids here: no text, no stop strings
        def decode(self, ids, skip_special_tokens=False):
            return ""

    shape = resolve(ModelConfig(preset=preset, vocab_size=vocab_size))
    lm = Model(backend, shape, model.init_params(shape, 0))
    module = TrainModule(backend, shape, OptimConfig())
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, vocab_size, prompt_len).tolist() for _ in range(prompts) for _ in range(group)]
    cfg = SamplingConfig(max_tokens=max_tokens, temperature=1.0, seed=0)
    generate_ids(lm, Ids(), batch[:group], SamplingConfig(max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    plain = generate_ids(lm, Ids(), batch, cfg)
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = generate_ids(GroupedPrefill(lm, group), Ids(), batch, cfg)
    rows = np.array([p + o.tokens for p, o in zip(batch, outs)])
    module.token_losses(lm.params, {"inputs": rows[:, :-1], "targets": rows[:, 1:]})
    rollout_s = time.perf_counter() - t0
    tokens = sum(len(o.tokens) for o in plain)
    return {"preset": preset, "prompts": prompts, "group": group, "prompt_len": prompt_len,
            "max_tokens": max_tokens, "generate_tokens_per_s": round(tokens / generate_s, 1),
            "rollout_tokens_per_s": round(sum(len(o.tokens) for o in outs) / rollout_s, 1),
            "ratio": round(sum(len(o.tokens) for o in outs) / rollout_s / (tokens / generate_s), 3)}


CASES = (("tiny", 512, 8, 5), ("mobilellm-125m", 512, 2, 3))


def run(backends=("torch", "mlx"), out: str | Path = "runs/bench.json", echo=print) -> dict:
    from tinylm.backends import get_backend

    report = {"train": []}
    for name in backends:
        backend = get_backend(name, "float32")
        peak = peak_flops(backend.device_name, "float32")
        source = "data sheet"
        if peak is None:
            peak, source = measured_matmul_peak(backend), "measured fp32 matmul"
        echo(f"{name} on {backend.device_name}: peak {peak / 1e9:,.0f} GFLOP/s ({source})")
        for preset, seq_len, batch, steps in CASES:
            shape, tps, losses = train_throughput(backend, preset, seq_len, batch, steps)
            util = tps * model.flops_per_token(shape, seq_len) / peak
            row = {"backend": name, "device": backend.device_name, "preset": preset, "seq_len": seq_len,
                   "batch_size": batch, "tokens_per_s": round(tps, 1), "mfu": round(util, 4),
                   "peak_flops": peak, "peak_source": source, "losses": [round(v, 5) for v in losses]}
            report["train"].append(row)
            echo(f"  {preset:16s} seq {seq_len}: {tps:9,.1f} tok/s  MFU {100 * util:5.1f}%  "
                 f"losses {', '.join(f'{v:.4f}' for v in losses)}")
        row = {"backend": name, **rollout_throughput(backend)}
        report.setdefault("rollouts", []).append(row)
        echo(f"  rollouts {row['preset']} {row['prompts']}x{row['group']}: {row['rollout_tokens_per_s']:,.1f} tok/s "
             f"vs generate {row['generate_tokens_per_s']:,.1f} tok/s ({row['ratio']:.2f}x)")
    from tinylm.data import bench as data_bench

    report["data"] = data_bench.run(echo=True)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    echo(f"wrote {path}")
    return report
