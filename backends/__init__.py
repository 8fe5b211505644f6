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


def get_backend(name: str = "auto", dtype: str = "float32", compile: bool | None = None):
    """An initialized backend object (see backends/torch and backends/mlx for the interface).

    `compile=None` leaves it to the backend: MLX compiles, PyTorch runs eagerly.
    """
    resolved, _ = pick(name)
    if not _has(resolved):
        raise UserError(f"backend {resolved!r} is not installed: pip install 'tinylm[{resolved}]'")
    if resolved == "mlx":
        from tinylm.backends.mlx import MLXBackend

        return MLXBackend(dtype=dtype, compile=True if compile is None else compile)
    from tinylm.backends.torch import TorchBackend

    return TorchBackend(dtype=dtype, compile=bool(compile))
