"""Backends: each supplies array operations, autodiff, compilation and conversion; the model and the
optimizer rules live once in `tinylm`. Imported as `tinylm.backends`."""

from __future__ import annotations

import importlib.util
import platform
import sys

from tinylm.errors import UserError

NAMES = ("auto", "mlx", "torch")


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pick(name: str = "auto") -> tuple[str, str]:
    """Resolve a backend name; returns (name, reason) so callers can say why it was picked."""
    if name not in NAMES:
        raise UserError(f"unknown backend {name!r} (choose from {', '.join(NAMES)})")
    if name != "auto":
        return name, "asked for"
    if _is_apple_silicon() and _has("mlx"):
        return "mlx", "Apple silicon with MLX installed"
    if _has("torch"):
        import torch

        if torch.cuda.is_available():
            return "torch", f"CUDA device {torch.cuda.get_device_name()}"
        return "torch", "no Apple silicon or CUDA device; PyTorch on CPU"
    if _has("mlx"):
        return "mlx", "PyTorch is not installed; MLX on CPU"
    raise UserError("no backend installed: pip install 'tinylm[torch]' or 'tinylm[mlx]'")


# On a CPU, bf16 is chosen only when its measured matmuls beat fp32's by this much: a near tie is noise, and
# the elementwise work that bf16 adds to a step is not in the measurement.
BF16_MIN_SPEEDUP = 1.3
# What a CPU measures when it is not told the model (MobileLLM-125M's MLP, a 2 x 512-token micro-batch), and
# the most rows it measures, which keeps the measurement to seconds.
_DEFAULT_MLP, _DEFAULT_ROWS, _MAX_ROWS = (576, 1536), 1024, 2048


def _measured_choice(backend, shape, rows: int | None) -> tuple[str, str]:
    from tinylm.mfu import bf16_matmul_speedup, cached_measurement

    rows = min(rows or _DEFAULT_ROWS, _MAX_ROWS)
    dim, ffn = (shape.dim, shape.ffn_dim) if shape is not None else _DEFAULT_MLP
    # The MLP's two matmuls and the output head: most of a step's FLOPs.
    shapes = [(rows, dim, ffn), (rows, ffn, dim)] + ([(rows, dim, shape.vocab_size)] if shape is not None else [])
    what = "bf16 speedup " + " ".join("x".join(map(str, s)) for s in shapes)
    speedup, cached = cached_measurement(backend, what, lambda: bf16_matmul_speedup(backend, shapes, repeats=2))
    choice = "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
    return choice, (f"bf16 matmuls {speedup:.2f}x as fast as fp32 at this model's sizes on {backend.device_name}, "
                    f"{BF16_MIN_SPEEDUP}x needed; {'cached ' if cached else ''}measurement")


def resolve_dtype(backend, dtype: str, shape=None, rows: int | None = None) -> tuple[str, str]:
    """(compute dtype, why). "auto" is settled once per backend object: by the device where it decides (CUDA,
    MLX), else by timing bf16 and fp32 matmuls of `shape` (the model's) on `rows` tokens (a micro-batch's), a
    measurement made once per machine and sizes and cached with the MFU peaks."""
    if dtype != "auto":
        return dtype, "asked for"
    if getattr(backend, "_auto_dtype", None) is None:
        backend._auto_dtype = backend.auto_dtype() or _measured_choice(backend, shape, rows)
    return backend._auto_dtype


def get_backend(name: str = "auto", dtype: str = "float32", compile: bool | None = None, shape=None,
                rows: int | None = None):
    """An initialized backend object (see backends/torch and backends/mlx for the interface).

    `compile=None` leaves it to the backend: MLX compiles, PyTorch runs eagerly. `dtype="auto"` is resolved
    here into `backend.dtype` (see `resolve_dtype` for `shape` and `rows`).
    """
    resolved, _ = pick(name)
    if not _has(resolved):
        raise UserError(f"backend {resolved!r} is not installed: pip install 'tinylm[{resolved}]'")
    asked = "float32" if dtype == "auto" else dtype  # a placeholder until the backend can measure
    if resolved == "mlx":
        from tinylm.backends.mlx import MLXBackend

        backend = MLXBackend(dtype=asked, compile=True if compile is None else compile)
    else:
        from tinylm.backends.torch import TorchBackend

        backend = TorchBackend(dtype=asked, compile=bool(compile))
    backend.dtype = resolve_dtype(backend, dtype, shape, rows)[0]
    return backend
