"""Model FLOPs utilization against the device's dense peak.

On a GPU of the table below the peak is the data-sheet number. Anywhere else (a CPU, an unlisted GPU) a
borrowed peak would be a made-up number, so the peak is measured: the best of a few large matmuls through the
backend's own linear op, in the training dtype. The measurement takes about a second and is cached per
machine, backend and dtype (`~/.cache/tinylm/peaks.json`, or `$TINYLM_CACHE_DIR`); `tinylm bench` measures
again and refreshes the cache.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from tinylm.machine import this_cpu

# Dense (no sparsity) peak FLOP/s by device-name fragment and compute dtype, from the vendors' data sheets.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100 SXM": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "A10G": {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12},
    "RTX 4090": {"bfloat16": 165e12, "float16": 165e12, "float32": 83e12},
}


def peak_flops(device_name: str, dtype: str) -> float | None:
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment.lower() in device_name.lower():
            return peaks.get(dtype)
    return None


def _best_seconds(backend, fn, repeats: int, budget: float = 0.0) -> float:
    """Fastest of at least `repeats` timed calls of `fn` (more, up to 100, until `budget` seconds are spent: a
    call of microseconds needs many tries to see its speed), after one untimed call that pays for first use."""
    best, spent, i = float("inf"), 0.0, 0
    while i <= repeats or (spent < budget and i <= 100):
        t0 = time.perf_counter()
        backend.materialize(fn())
        backend.sync()
        took = time.perf_counter() - t0
        if i:
            best, spent = min(best, took), spent + took
        i += 1
    return best


def _operands(backend, rows: int, inner: int, out: int, rng) -> tuple:
    """A (rows, inner) input and an (out, inner) weight, float32, on the backend's device."""
    arrays = backend.from_numpy({"x": rng.standard_normal((rows, inner), dtype=np.float32),
                                 "w": rng.standard_normal((out, inner), dtype=np.float32)})
    return arrays["x"], arrays["w"]


def measured_matmul_peak(backend, dtype: str = "float32", sizes=(512, 1024, 2048), repeats: int = 3) -> float:
    """Best FLOP/s of square matmuls in `dtype` through the backend's own linear op, over a few sizes."""
    rng, ops, best = np.random.default_rng(0), backend.ops, 0.0
    for n in sizes:
        a, b = (ops.cast(x, dtype) for x in _operands(backend, n, n, n, rng))
        best = max(best, 2.0 * n**3 / _best_seconds(backend, lambda: ops.linear(a, b), repeats))
    return best


def cache_dir() -> Path:
    """Where tinylm keeps what it measures or writes once per machine: `$TINYLM_CACHE_DIR`, else
    `~/.cache/tinylm`."""
    return Path(os.environ.get("TINYLM_CACHE_DIR") or Path.home() / ".cache" / "tinylm")


def _cache_path() -> Path:
    return cache_dir() / "peaks.json"


def machine_key(backend, what: str, cpu: dict | None = None) -> str:
    """The cache key of measurement `what` on this machine (`cpu`: `tinylm.machine.cpu_info()`'s, this one's
    unless given) and backend."""
    # The processor, its instruction sets and the thread count decide a CPU's speed; the host name keeps
    # shared home folders apart.
    cpu = cpu or this_cpu()
    threads = os.environ.get("OMP_NUM_THREADS") or str(cpu["cores"])
    return "|".join([platform.node(), cpu["model"], " ".join(cpu["flags"]), backend.name, backend.device_name,
                     what, threads])


def _valid(value) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(_valid(v) for v in value.values())
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def cached_measurement(backend, what: str, measure, refresh: bool = False):
    """(value, whether it came from the cache) of what `measure()` gives for this machine and backend (a
    positive number, or a dict of them), kept in the cache file under `what` (a dtype for a peak) so that it
    is measured once."""
    path, key = _cache_path(), machine_key(backend, what)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not refresh and _valid(cache.get(key)):
        value = cache[key]
        return (dict(value) if isinstance(value, dict) else float(value)), True
    value = measure()
    cache[key] = value
    try:  # a read-only home folder costs a re-measurement next time, nothing more
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
    return value, False


def cached_peak(backend, dtype: str, refresh: bool = False) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for the backend's device: the data sheet, else a cached measurement."""
    sheet = peak_flops(backend.device_name, dtype)
    if sheet:
        return sheet, "data sheet"
    peak, cached = cached_measurement(backend, dtype, lambda: measured_matmul_peak(backend, dtype), refresh)
    return peak, f"measured {dtype} matmul" + (" (cached)" if cached else "")


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_s * flops_per_token / peak


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
