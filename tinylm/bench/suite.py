"""`tinylm bench`: training throughput and MFU per backend, measured against this machine's own matmul peak.

MFU needs a peak. On a device of the table in `tinylm.mfu` that is the data-sheet number; elsewhere (a CPU)
the peak is measured here as the best of several large matmuls in the benchmark's dtype (and cached for the
training logs), so the percentage says how much of what this machine can do the training step achieves. Losses are printed next to the
speeds so that a faster configuration can be checked to compute the same thing. A case run in bf16 as well
(`EXTRA_DTYPES`) gets a row of its own, its MFU against the bf16 peak.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from tinylm import model
from tinylm.bench.memory import peak_memory_mb
from tinylm.machine import cpu_summary, this_cpu
from tinylm.mfu import cached_peak
from tinylm.model import ModelConfig, resolve
from tinylm.train.optim import OptimConfig
from tinylm.train.step import TrainModule


def train_throughput(backend, config: ModelConfig, seq_len: int, batch_size: int, steps: int,
                     dtype: model.Compute | str = "float32", warmup: int = 1):
    """tokens/s of full optimizer steps computed as `dtype` (a dtype name or a `model.Compute`), after `warmup`
    untimed steps, and the losses of every step."""
    shape = resolve(config)
    backend.reset_peak_memory()
    module = TrainModule(backend, shape, OptimConfig(lr=1e-3), dtype)
    params = backend.from_numpy(model.init_params(shape, 0))
    state = module.init_state(params)
    rows = np.random.default_rng(0).integers(0, shape.vocab_size, (batch_size, seq_len + 1))
    losses, elapsed = [], 0.0
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        params, state, loss, _ = module.step(params, state, [rows], 1e-3, step + 1)
        backend.sync()
        if step >= warmup:
            elapsed += time.perf_counter() - t0
        losses.append(loss)
    tokens_per_s = steps * batch_size * seq_len / elapsed
    return shape, tokens_per_s, losses


def rollout_throughput(backend, preset: str = "tiny", prompts: int = 8, group: int = 8, prompt_len: int = 64,
                       max_tokens: int = 64, vocab_size: int = 2048, repeats: int = 2) -> dict:
    """RL rollouts as `tinylm.post.rl` draws them (grouped prefill, sampling, the training rows and the sampled
    tokens' log-probabilities the objective needs) against `tinylm generate`'s batched decoding of the same
    prompts, in generated tokens/s on the same model."""
    from tinylm.generate import Model, SamplingConfig, generate_ids
    from tinylm.post.rl import GroupedPrefill, pack_rollouts

    class Ids:  # decoding needs only token ids here: no text, no stop strings
        def decode(self, ids, skip_special_tokens=False):
            return ""

    shape = resolve(ModelConfig(preset=preset, vocab_size=vocab_size))
    lm = Model(backend, shape, model.init_params(shape, 0))
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, vocab_size, prompt_len).tolist() for _ in range(prompts) for _ in range(group)]
    cfg = SamplingConfig(max_tokens=max_tokens, temperature=1.0, seed=0)
    generate_ids(lm, Ids(), batch[:group], SamplingConfig(max_tokens=2))  # warm-up
    generate_s = rollout_s = float("inf")
    # Interleaved, best of `repeats` each: whichever ran first in a process would otherwise pay its warm-up.
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain = generate_ids(lm, Ids(), batch, cfg)
        generate_s = min(generate_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        outs = generate_ids(GroupedPrefill(lm, group), Ids(), batch, cfg)
        pack_rollouts(batch, outs, prompt_len, prompt_len + max_tokens - 1, 0)
        rollout_s = min(rollout_s, time.perf_counter() - t0)
    tokens = sum(len(o.tokens) for o in plain)
    return {"preset": preset, "prompts": prompts, "group": group, "prompt_len": prompt_len,
            "max_tokens": max_tokens, "generate_tokens_per_s": round(tokens / generate_s, 1),
            "rollout_tokens_per_s": round(sum(len(o.tokens) for o in outs) / rollout_s, 1),
            "ratio": round(sum(len(o.tokens) for o in outs) / rollout_s / (tokens / generate_s), 3)}


def rollouts(backends=("torch", "mlx"), echo=print) -> list[dict]:
    """`rollout_throughput` on each backend alone (the rollout part of `make bench`), one line per backend."""
    from tinylm.backends import get_backend

    rows = []
    for name in backends:
        row = {"backend": name, **rollout_throughput(get_backend(name, "float32"))}
        rows.append(row)
        echo(f"  rollouts {name} {row['preset']} {row['prompts']}x{row['group']}: "
             f"{row['rollout_tokens_per_s']:,.1f} tok/s vs generate {row['generate_tokens_per_s']:,.1f} tok/s "
             f"({row['ratio']:.2f}x)")
    return rows


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
# Cases measured again in another compute dtype, a row each, on the backends where that dtype can pay off:
# bf16 on torch (AMX CPUs, GPUs), which is what `train.dtype = "auto"` picks for these shapes on an AMX CPU.
# MLX's bf16 matmul on a Linux CPU is slower than its fp32.
EXTRA_DTYPES = {("torch", "nanogpt-shape"): ("bfloat16",), ("torch", "mobilellm-125m"): ("bfloat16",)}
# Cases measured again with the step compiled by torch.compile (`train.compile = true`), a row per compute
# dtype listed: the small ones, where per-operation overhead rules. MLX compiles its step by default.
COMPILED = {("torch", "nanogpt-shape"): ("float32", "bfloat16"), ("torch", "tiny"): ("float32",)}
# On a CUDA device the cases above are too small to occupy it; these are sized for an 80-141 GB GPU and each
# runs in fp32 (TF32 matmuls), in bf16, and in bf16 with the step compiled by torch.compile.
GPU_CASES = (
    ("mobilellm-125m-gpu", ModelConfig(preset="mobilellm-125m", vocab_size=32000), 2048, 16, 10),
    ("mobilellm-r1-140m-gpu", ModelConfig(preset="mobilellm-r1-140m"), 2048, 8, 10),
)


def _row(name, backend_name, device, tps, flops_per_token, peak, source, memory_mb, losses,
         dtype: str = "float32") -> dict:
    return {"name": name, "backend": backend_name, "device": device, "dtype": dtype,
            "tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token / peak, 4),
            "peak_gflops": round(peak / 1e9, 1), "peak_source": source, "peak_memory_mb": memory_mb,
            "losses": [round(v, 5) for v in losses]}


def _measure(backend, case: tuple, dtype: str, peak: tuple[float, str], compiled: bool = False) -> dict:
    """The row of `case` ((name, model, seq_len, batch, steps), as in `CASES`) trained on `backend` in compute
    dtype `dtype`, its MFU against `peak` ((FLOP/s, source)); `compiled`: on a torch.compile'd copy of the
    backend, after two more untimed steps (compilation, and room for a recompilation). The row's `compiled`
    says whether the step ran compiled: MLX's rows are, by MLX's default."""
    name, config, seq_len, batch, steps = case
    runner = backend
    if compiled:
        from tinylm.backends import get_backend

        runner = get_backend(backend.name, "float32", compile=True)
    shape, tps, losses = train_throughput(runner, config, seq_len, batch, steps, dtype, 3 if compiled else 1)
    row = _row(name, backend.name, backend.device_name, tps, model.flops_per_token(shape, seq_len), *peak,
               peak_memory_mb(runner), losses, dtype)
    row.update(seq_len=seq_len, batch_size=batch, compiled=bool(runner.use_compile))
    return row


def train_case(backend, row_name: str, dtype: str = "float32", peak: tuple[float, str] | None = None,
               compiled: bool = False) -> dict:
    """`_measure` of the `CASES` row `row_name`; `peak` defaults to the cached peak of `dtype`."""
    case = next(case for case in CASES if case[0] == row_name)
    return _measure(backend, case, dtype, peak or cached_peak(backend, dtype), compiled)


def gpu_rows(backend, peaks: dict, echo=print) -> list[dict]:
    """`GPU_CASES` on a CUDA backend: per case an fp32 row, a bf16 row and a compiled bf16 row."""
    rows = []
    for case in GPU_CASES:
        first = None
        for dtype, compiled in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
            rows.append(_measure(backend, case, dtype, peaks[dtype], compiled))
            _say(rows[-1], echo, first)
            first = first or rows[-1]
    return rows


def _variant(row: dict) -> str:
    return row["dtype"] + ("+compile" if row.get("compiled") else "")


def _say(row: dict, echo, fp32: dict | None = None) -> None:
    versus = f"  ({row['tokens_per_s'] / fp32['tokens_per_s']:.2f}x fp32)" if fp32 else ""
    dtype = _variant(row)
    echo(f"  {row['name']:16s} {dtype:8s} seq {row['seq_len']}: {row['tokens_per_s']:9,.1f} tok/s  "
         f"MFU {100 * row['mfu']:5.1f}%  losses {', '.join(f'{v:.4f}' for v in row['losses'])}{versus}")


def case_rows(backend, row_name: str, peaks: dict | None = None, echo=print) -> list[dict]:
    """A case's fp32 row, then a row per dtype `EXTRA_DTYPES` adds on this backend, each MFU against its own
    dtype's peak (`peaks`: {dtype: (FLOP/s, source)}; default: measured afresh), then a compiled row per dtype
    `COMPILED` lists. `make bench` runs every case this way; one case alone:
    `case_rows(get_backend("torch"), "mobilellm-125m")`."""
    key = (backend.name, row_name)
    variants = [(dtype, False) for dtype in ("float32", *EXTRA_DTYPES.get(key, ()))]
    variants += [(dtype, True) for dtype in COMPILED.get(key, ())]
    rows = []
    for dtype, compiled in variants:
        peak = peaks[dtype] if peaks else cached_peak(backend, dtype, refresh=True)
        rows.append(train_case(backend, row_name, dtype, peak, compiled))
        _say(rows[-1], echo, rows[0] if len(rows) > 1 else None)
    return rows


def machine() -> dict:
    """What the figures were measured on: the processor's model, the cores this process may use and its ISA
    flags (`tinylm.machine.cpu_info`), with the operating system and the framework versions."""
    import platform
    from importlib import metadata

    versions = {}
    for package in ("torch", "mlx", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": this_cpu(), "system": f"{platform.system()} {platform.release()}", "versions": versions}


def run(backends=("torch", "mlx"), out: str | Path = "bench.json", echo=print) -> dict:
    from tinylm.backends import get_backend

    report = {"machine": machine(), "train": []}
    echo(f"machine: {cpu_summary(report['machine']['cpu'])}")
    on_cuda = {}
    for name in backends:
        backend = get_backend(name, "float32")
        on_cuda[name] = name == "torch" and backend.device.type == "cuda"
        extra = sorted({d for (b, _), dtypes in EXTRA_DTYPES.items() if b == name for d in dtypes})
        peaks = {dtype: cached_peak(backend, dtype, refresh=True) for dtype in ["float32", *extra]}
        for dtype, (peak, source) in peaks.items():
            echo(f"{name} on {backend.device_name}: {dtype} peak {peak / 1e9:,.0f} GFLOP/s ({source})")
        for row_name, config, seq_len, batch, steps in CASES:
            rows = case_rows(backend, row_name, peaks, echo)
            report["train"].extend(rows)
            if row_name == "nanogpt-shape" and name == "torch":
                from tinylm.bench.baseline import baseline_throughput

                base_tps, base_losses = baseline_throughput(steps=steps, **NANOGPT)
                peak, source = peaks["float32"]
                base = _row("nanogpt-shape-baseline", "torch (plain eager GPT)", backend.device_name, base_tps,
                            model.flops_per_token(resolve(config), seq_len), peak, source,
                            peak_memory_mb(backend), base_losses)
                base.update(seq_len=seq_len, batch_size=batch)
                report["train"].append(base)
                versus = ", ".join(f"{_variant(r)} {r['tokens_per_s'] / base_tps:.2f}x" for r in rows)
                echo(f"  {'  plain eager GPT':25s} seq {seq_len}: {base_tps:9,.1f} tok/s  (tinylm {versus})")
        if on_cuda[name]:
            report["train"].extend(gpu_rows(backend, peaks, echo))
        report.setdefault("rollouts", []).extend(rollouts([name], echo))
        if name == "torch" and importlib.util.find_spec("transformers"):
            from tinylm.bench.generation import decode_rows

            from tinylm.bench.real_shape import memory_rows, training_rows

            report.setdefault("generation", []).extend(decode_rows(backend, dtypes=("float32", "bfloat16"),
                                                                   echo=echo))
            report.setdefault("real_shape", []).extend(training_rows(backend, echo=echo))
            # As a real-model recipe on a 16 GiB laptop runs them: the head in chunks, blocks recomputed in
            # the backward pass, and the GRPO step's 64 rollouts in micro-batches of 16.
            lean = dict(echo=echo, loss_chunk=512, checkpoint_blocks=True)
            report["real_shape"].extend(memory_rows((name,), ("sft",), **lean))
            report["real_shape"].extend(memory_rows((name,), ("grpo",), grad_accum=4, **lean))
    from tinylm.bench import memory as bench_memory

    for name in backends:  # each case in a fresh process; on a GPU at the 8 x 2048 tokens of the case
        batch = 8 if on_cuda[name] else bench_memory.BATCH_SIZE
        report["train"].extend(bench_memory.rows((name,), echo, batch_size=batch))
    from tinylm.bench import data as data_bench

    report["data"] = data_bench.run(echo=True)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    echo(f"wrote {path}")
    return report
