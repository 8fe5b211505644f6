"""Memory per rank of data parallelism on PyTorch, by how much is sharded: nothing (DDP), the optimizer state
(`train.shard_optimizer`, ZeRO stage 1) or the parameters as well (`train.shard_params`, ZeRO stage 3), the
last with and without activation checkpointing.

    python -m tinylm.bench.sharding --preset mobilellm-125m --ranks 2

launches each case under `torchrun` on this machine (gloo on a CPU, NCCL on GPUs) and prints a row per case.
A row gives, for the largest rank, the bytes of the weights and optimizer state it keeps from one step to the
next, its resident memory after the steps, its peak during them, and rank 0's seconds per step (the first
step included). On a CPU those are the process's resident size (Linux `VmRSS`, and `VmHWM` reset once the model is
built); on CUDA the allocator's figures. The losses show that every case trains the same numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import typer

MODES = {
    "replicated": {},
    "shard_optimizer": {"shard_optimizer": True},
    "shard_params": {"shard_params": True},
    "shard_params+checkpointing": {"shard_params": True, "checkpoint": True},
}


def _memory_mb(backend) -> tuple[float, float]:
    """(resident now, peak since the last reset) in MiB."""
    if backend.device.type == "cuda":
        import torch

        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def _reset_peak(backend) -> None:
    if backend.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from VmRSS


def rank_case(mode: str, preset: str, batch_size: int, seq_len: int, steps: int) -> dict | None:
    """One case on this rank (started by torchrun); rank 0 returns the row."""
    from tinylm import model
    from tinylm.backends import get_backend
    from tinylm.model import ModelConfig, resolve
    from tinylm.train.optim import OptimConfig
    from tinylm.train.step import TrainModule

    backend = get_backend("torch", "float32")
    flags = MODES[mode]
    shape = resolve(ModelConfig(preset=preset))
    module = TrainModule(backend, shape, OptimConfig(), model.Compute("float32", 0, flags.get("checkpoint", False)),
                         shard_optimizer=flags.get("shard_optimizer", False),
                         shard_params=flags.get("shard_params", False))
    params = backend.from_numpy(module.parallel.local(model.init_params(shape, 0)))
    state = module.init_state(params)
    rng = np.random.default_rng(backend.rank)
    _reset_peak(backend)
    losses, seconds = [], 0.0
    for step in range(1, steps + 1):
        rows = rng.integers(0, shape.vocab_size, (batch_size, seq_len + 1))
        start = time.perf_counter()
        params, state, loss, _ = module.step(params, state, [rows], 1e-3, step)
        seconds += time.perf_counter() - start
        losses.append(round(loss, 5))
    kept = sum(x.nbytes for x in (*params.values(), *state.values())) / 2**20
    # Each rank's figures in its own column, summed over ranks: every rank's, on every rank.
    mine = np.zeros((3, backend.world_size), np.float32)
    mine[:, backend.rank] = (kept, *_memory_mb(backend))
    (every,) = backend.all_sum_flat([backend.from_numpy({"m": mine})["m"]])
    kept_all, resident_all, peak_all = backend.to_numpy({"m": every})["m"]
    rank = backend.rank
    backend.close()
    if rank:
        return None
    return {"name": f"{preset}-{mode}", "backend": "torch", "device": backend.device_name, "ranks": len(resident_all),
            "batch_size": batch_size, "seq_len": seq_len, "kept_mb": round(float(kept_all.max()), 1), "resident_mb": round(float(resident_all.max()), 1),
            "peak_memory_mb": round(float(peak_all.max()), 1), "seconds_per_step": round(seconds / steps, 3),
            "losses": losses}


app = typer.Typer(add_completion=False, help="Memory per rank by what is sharded (see the module's docstring).")


@app.command()
def run(preset: str = typer.Option("mobilellm-125m"), ranks: int = typer.Option(2),
        batch_size: int = typer.Option(1), seq_len: int = typer.Option(256), steps: int = typer.Option(2),
        out: Path = typer.Option(None, help="Also write the rows here as JSON.")):
    """Every case, each in its own `torchrun` launch of `ranks` processes."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        raise SystemExit("error: torchrun is not installed")
    # glibc keeps freed blocks under its mmap threshold (which rises to 32 MiB as large blocks are freed) for
    # reuse, so resident size would show what the allocator once held; a fixed 64 KiB threshold hands every
    # tensor its own mapping, returned when the tensor goes.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for mode in MODES:
        done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(ranks), "-m", "tinylm.bench.sharding",
                               "case", mode, preset, str(batch_size), str(seq_len), str(steps)],
                              capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"error: case {mode} failed:\n{done.stderr[-3000:]}")
        row = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])
        rows.append(row)
        print(f"{mode:28s} weights and state {row['kept_mb']:7,.0f} MiB  resident {row['resident_mb']:7,.0f} MiB  peak {row['peak_memory_mb']:8,.0f} MiB  "
              f"{row['seconds_per_step']:6.2f} s/step  losses {row['losses']}", flush=True)
    if out is not None:
        out.write_text(json.dumps(rows, indent=1) + "\n")


@app.command(hidden=True)
def case(mode: str, preset: str, batch_size: int, seq_len: int, steps: int):
    """One case on this rank, as `run` starts it under torchrun."""
    row = rank_case(mode, preset, batch_size, seq_len, steps)
    if row is not None:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app()
