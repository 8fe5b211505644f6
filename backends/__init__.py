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


def resolve_dtype(backend, dtype: str) -> tuple[str | None, str]:
    """(compute dtype, why) where it is settled without running the model: asked for, or "auto" on a device that
    settles it (`backend.auto_dtype()`: CUDA, MLX). (None, why) where "auto" is left to timing the model's own
    training steps in each dtype (a CPU under PyTorch: see `tinylm.train.autotune`)."""
    if dtype != "auto":
        return dtype, "asked for"
    return backend.auto_dtype() or (None, "timed on a few training steps of each stage's model")


def get_backend(name: str = "auto", dtype: str = "float32", compile: bool | None = None):
    """An initialized backend object (see backends/torch and backends/mlx for the interface).

    `compile=None` leaves it to the backend: MLX compiles, PyTorch runs eagerly (a trainer times both where the
    recipe leaves `train.compile` unset: `tinylm.train.autotune`). `dtype="auto"` is resolved here into
    `backend.dtype` where the device settles it, else float32 stands in until a trainer times the model.
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
    backend.dtype = resolve_dtype(backend, dtype)[0] or "float32"
    return backend
