"""`tinylm bench`: training throughput and MFU per backend, measured against this machine's own matmul peak.

MFU needs a peak. On a device of the table in `tinylm.mfu` that is the data-sheet number; elsewhere (a CPU)
the peak is measured here as the best of several large matmuls in the benchmark's dtype (and cached for the
training logs), so the percentage says how much of what this machine can do the training step achieves. Losses are printed next to the
speeds so that a faster configuration can be checked to compute the same thing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from tinylm import model
from tinylm.mfu import cached_peak
from tinylm.model import ModelConfig, resolve
from tinylm.optim import OptimConfig
from tinylm.train_module import TrainModule


def train_throughput(backend, config: ModelConfig, seq_len: int, batch_size: int, steps: int):
    """tokens/s of full optimizer steps (after one warm-up step) and the losses of every step."""
    shape = resolve(config)
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


# (row name, model, sequence length, batch size, timed steps). `nanogpt-shape` is nanoGPT's CPU example
# (4 layers, width 128, 4 heads, context 64, batch 12, 65 characters), with a SwiGLU width of the same
# parameter count as its 4x GELU MLP.
NANOGPT = dict(layers=4, width=128, heads=4, context=64, batch_size=12, vocab_size=65)
CASES = (
    ("nanogpt-shape", ModelConfig(preset="micro", n_layers=4, dim=128, n_heads=4, n_kv_heads=4, ffn_dim=344,
                                  vocab_size=65, qk_norm=False), 64, 12, 40),
    ("tiny", ModelConfig(preset="tiny", vocab_size=32000), 512, 8, 5),
    ("mobilellm-125m", ModelConfig(preset="mobilellm-125m", vocab_size=32000), 512, 2, 3),
)


def _peak_memory_mb(backend) -> float:
    """The backend's peak allocation where it keeps one (CUDA, MLX); else this process's peak resident size."""
    peak = backend.peak_memory_bytes()
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return round(peak / 2**20, 1)


def _row(name, backend_name, device, tps, flops_per_token, peak, source, memory_mb, losses) -> dict:
    return {"name": name, "backend": backend_name, "device": device, "dtype": "float32",
            "tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token / peak, 4),
            "peak_gflops": round(peak / 1e9, 1), "peak_source": source, "peak_memory_mb": memory_mb,
            "losses": [round(v, 5) for v in losses]}


def run(backends=("torch", "mlx"), out: str | Path = "bench.json", echo=print) -> dict:
    from tinylm.backends import get_backend

    report = {"train": []}
    for name in backends:
        backend = get_backend(name, "float32")
        peak, source = cached_peak(backend, "float32", refresh=True)
        echo(f"{name} on {backend.device_name}: peak {peak / 1e9:,.0f} GFLOP/s ({source})")
        for row_name, config, seq_len, batch, steps in CASES:
            shape, tps, losses = train_throughput(backend, config, seq_len, batch, steps)
            flops = model.flops_per_token(shape, seq_len)
            row = _row(row_name, name, backend.device_name, tps, flops, peak, source, _peak_memory_mb(backend),
                       losses)
            row.update(seq_len=seq_len, batch_size=batch)
            report["train"].append(row)
            echo(f"  {row_name:16s} seq {seq_len}: {tps:9,.1f} tok/s  MFU {100 * row['mfu']:5.1f}%  "
                 f"losses {', '.join(f'{v:.4f}' for v in losses)}")
            if row_name == "nanogpt-shape" and name == "torch":
                from tinylm.bench_baseline import baseline_throughput

                base_tps, base_losses = baseline_throughput(steps=steps, **NANOGPT)
                base = _row("nanogpt-shape-baseline", "torch (plain eager GPT)", backend.device_name, base_tps,
                            flops, peak, source, _peak_memory_mb(backend), base_losses)
                base.update(seq_len=seq_len, batch_size=batch)
                report["train"].append(base)
                echo(f"  {'  plain eager GPT':16s} seq {seq_len}: {base_tps:9,.1f} tok/s  "
                     f"(tinylm {tps / base_tps:.2f}x)")
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
