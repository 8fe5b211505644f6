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


def measured_matmul_peak(backend, dtype: str = "float32", sizes=(512, 1024, 2048), repeats: int = 3) -> float:
    """Best FLOP/s of square matmuls in `dtype` through the backend's own linear op, over a few sizes."""
    rng = np.random.default_rng(0)
    best = 0.0
    for n in sizes:
        arrays = backend.from_numpy({"a": rng.standard_normal((n, n), dtype=np.float32),
                                     "b": rng.standard_normal((n, n), dtype=np.float32)})
        a, b = (backend.ops.cast(arrays[k], dtype) for k in ("a", "b"))
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            out = backend.ops.linear(a, b)
            backend.materialize(out)
            backend.sync()
            best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def _cache_path() -> Path:
    root = os.environ.get("TINYLM_CACHE_DIR") or Path.home() / ".cache" / "tinylm"
    return Path(root) / "peaks.json"


def _machine_key(backend, dtype: str) -> str:
    # The processor and the thread count decide a CPU's peak; the host name keeps shared home folders apart.
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    return "|".join([platform.node(), platform.processor() or platform.machine(), backend.name,
                     backend.device_name, dtype, threads])


def cached_peak(backend, dtype: str, refresh: bool = False) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for the backend's device: the data sheet, else a cached measurement."""
    sheet = peak_flops(backend.device_name, dtype)
    if sheet:
        return sheet, "data sheet"
    path, key = _cache_path(), _machine_key(backend, dtype)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not refresh and isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key]), f"measured {dtype} matmul (cached)"
    peak = measured_matmul_peak(backend, dtype)
    cache[key] = peak
    try:  # a read-only home folder costs a re-measurement next time, nothing more
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
    return peak, f"measured {dtype} matmul"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_s * flops_per_token / peak


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
