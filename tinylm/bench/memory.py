"""`make bench`'s memory rows: peak memory of the output head and its loss, whole logits against `loss_chunk`.

The case is the head of `mobilellm-r1-140m` (width 576, vocabulary 128,256), the part of its training step
that `train.loss_chunk` changes: final hidden states -> logits -> cross-entropy, forward and backward, through
`model.chunked_head` as every objective runs it. Only the head, not the whole model, and 4 x 2048 tokens, not
8 x 2048: whole float32 logits of 8 x 2048 tokens are 7.8 GiB an array, and PyTorch's step holds three of
them at once, more than the development machine's 23 GiB.

Each case runs in a process of its own, since a process's peak only grows. PyTorch on a CPU reports the
process's peak resident size, CUDA and MLX their allocators' peaks. MLX allocates each queued operation's
output as it queues it, running ahead of the computation while memory is free (its default limit is most of
the machine), so its cases run under a 1 MiB limit, which makes it wait for queued work instead: the peak is
then what the step needs, not what MLX took because it could.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from tinylm import model
from tinylm.model import ModelConfig, resolve

PRESET, BATCH_SIZE, SEQ_LEN = "mobilellm-r1-140m", 4, 2048
CHUNKS = (0, 512)
"""`loss_chunk` of each row: 0 (whole logits) against chunks of 512 tokens."""


def peak_memory_mb(backend) -> float:
    """The backend's peak allocation where it keeps one (CUDA, MLX); else this process's peak resident size."""
    peak = backend.peak_memory_bytes()
    if peak is None:
        peak = resident_peak_bytes()
    return round(peak / 2**20, 1)


def resident_peak_bytes() -> int:
    """This process's peak resident size. Linux's VmHWM counts from this program's start; `getrusage`'s maxrss
    keeps the peak of the process that started it across exec, so a child would show its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux, bytes on macOS


def loss_head_memory(backend_name: str, preset: str, batch_size: int, seq_len: int, loss_chunk: int) -> dict:
    """One step of the head and its mean cross-entropy on random hidden states (batch, time, dim) of `preset`,
    with gradients for the head and the hidden states, as a `bench.json` row: its peak memory, loss and
    seconds (one step, the first: MLX's compilation included). The peak is this process's: call it in a
    fresh one (`rows` does)."""
    from tinylm.backends import get_backend

    backend = get_backend(backend_name, "float32")
    if backend.name == "mlx":  # measured under a low limit: see above
        import mlx.core as mx

        mx.set_memory_limit(1 << 20)
    shape = resolve(ModelConfig(preset=preset))
    rng = np.random.default_rng(0)
    head = rng.standard_normal((shape.vocab_size, shape.dim), dtype=np.float32)
    head *= shape.init_std  # in place: a second host copy of the head would raise the process's peak
    params = backend.from_numpy({"hidden": rng.standard_normal((batch_size, seq_len, shape.dim), dtype=np.float32),
                                 "head": head})
    del head
    targets = backend.tokens(rng.integers(0, shape.vocab_size, (batch_size, seq_len)))
    ops = backend.ops

    def loss(p, targets):
        return model.chunked_head(ops, p["hidden"], p["head"], loss_chunk, ops.linear_cross_entropy, (targets,)).mean()

    t0 = time.perf_counter()
    value, grads = backend.grad_step(loss)(params, targets)
    backend.materialize((value, grads))
    backend.sync()
    seconds = time.perf_counter() - t0
    return {"name": f"{preset}-loss-head-memory", "backend": backend.name, "device": backend.device_name,
            "dtype": "float32", "peak_memory_mb": peak_memory_mb(backend), "loss_chunk": loss_chunk,
            "seq_len": seq_len, "batch_size": batch_size, "losses": [round(backend.item(value), 5)],
            "seconds": round(seconds, 2)}


def in_fresh_process(module: str, function: str, kwargs: dict, what: str, timeout: float | None = None) -> dict:
    """`module.function(**kwargs)`'s JSON row, computed in a fresh Python process (a process's peak only
    grows); `what` names the case in the error when the child fails. Past `timeout` seconds the child is
    killed and `subprocess.TimeoutExpired` raised."""
    code = (f"import json, sys; from {module} import {function} as f; "
            "print(json.dumps(f(**json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def rows(backends=("torch", "mlx"), echo=print, preset: str = PRESET, batch_size: int = BATCH_SIZE,
         seq_len: int = SEQ_LEN, chunks=CHUNKS) -> list[dict]:
    """A row per backend and `loss_chunk`, each measured in a fresh Python process."""
    out = []
    for name in backends:
        for chunk in chunks:
            row = in_fresh_process(__name__, "loss_head_memory",
                                   {"backend_name": name, "preset": preset, "batch_size": batch_size,
                                    "seq_len": seq_len, "loss_chunk": chunk}, f"memory case {name} loss_chunk {chunk}")
            out.append(row)
            echo(f"  {row['name']} {name} loss_chunk {chunk:5d}: peak {row['peak_memory_mb']:9,.1f} MiB  "
                 f"loss {row['losses'][0]:.5f}  {row['seconds']:.1f} s")
    return out
