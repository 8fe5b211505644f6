"""What MLX's CPU backend on Linux needs from its surroundings to run at this machine's speed, set up once per
process by the MLX backend: a BLAS, and a compiler for its fused kernels that may vectorize them. Nothing here
imports mlx, so that the BLAS can be loaded before it.
Each has an opt-out environment variable, for comparisons and for machines where it misbehaves.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings

from tinylm.mfu import cache_dir

# MLX compiles each fused elementwise kernel of an `mx.compile`d function with `g++ -O3`, for the processor
# family's baseline (no AVX) and with its exp left as a call that the loop cannot vectorize across: a fused
# exp ran at about 85M values/s on one core here. These flags let GCC inline that exp and vectorize the loop
# for this processor: 890M/s for the same kernel (1,300M/s in cache). `-ffp-contract=off` keeps every
# multiply and add rounded on its own, as in MLX's own build, so the kernels compute bit for bit what they did.
# The others change no value either: math functions need not set errno, nor floating-point exceptions trap.
VECTORIZING_FLAGS = ("-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
                     "-finline-limit=10000")
# Where Debian installs OpenBLAS, its pthread build first.
OPENBLAS_PATTERNS = ("/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so*", "/usr/lib/*-linux-gnu/libopenblas.so*")
_MARKER = "# tinylm: MLX's kernel compiler, with flags that let it vectorize (backends/mlx/linux_cpu.py)"
vectorized_kernels = False  # whether `use_vectorizing_compiler` put its compiler in front of MLX's


def load_openblas() -> None:
    """Debian's OpenBLAS, loaded globally before mlx, whose symbols mlx then binds instead of the reference
    BLAS its Linux CPU wheel ships: fp32 matmul tens of times faster. Opt out: TINYLM_NO_OPENBLAS=1."""
    if not sys.platform.startswith("linux") or os.environ.get("TINYLM_NO_OPENBLAS"):
        return
    # PyTorch's CPU library exports its own BLAS and LAPACK (MKL's `sgemm_`, ...) and binds them when it is
    # loaded: loaded after OpenBLAS had gone global, it took OpenBLAS's instead, whose threads then fought
    # PyTorch's for the cores (`nanogpt-shape` on torch: 4,917 against 22,854 tok/s, and other losses).
    # Loaded first, each library keeps its own.
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401
    for pattern in OPENBLAS_PATTERNS:
        for path in sorted(glob.glob(pattern)):
            if "mlx.core" in sys.modules:  # too late: mlx has bound its own BLAS's symbols already
                warnings.warn("mlx was imported before tinylm's MLX backend, so its matmuls run on the reference BLAS"
                              " of its Linux wheel (tens of times slower): import tinylm.backends.mlx first",
                              RuntimeWarning, stacklevel=3)
                return
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def _is_wrapper(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "g++"), "rb") as compiler:
            return _MARKER.encode() in compiler.read(256)
    except OSError:
        return False


def use_vectorizing_compiler() -> bool:
    """Put a `g++` that adds `VECTORIZING_FLAGS` to every command first on this process's PATH, where MLX
    looks for its compiler (it has no setting for flags), and take out any such `g++` put there before (by a
    parent process, say). Kernels MLX compiled before stay in its cache (`mlx/` under the temporary directory)
    and go on being used as they are. Opt out: TINYLM_NO_NATIVE_KERNELS=1. Returns whether it is in place."""
    global vectorized_kernels
    if not sys.platform.startswith("linux"):
        return False
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not _is_wrapper(p)]
    os.environ["PATH"] = os.pathsep.join(path)
    vectorized_kernels = False
    real = shutil.which("g++")
    if os.environ.get("TINYLM_NO_NATIVE_KERNELS") or real is None:  # no g++: MLX runs compiled functions unfused
        return False
    folder = cache_dir() / "mlx-cxx"
    script = f"#!/bin/sh\n{_MARKER}\nexec '{os.path.abspath(real)}' {' '.join(VECTORIZING_FLAGS)} \"$@\"\n"
    wrapper = folder / "g++"
    try:
        if not wrapper.is_file() or wrapper.read_text() != script:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, prefix=".g++.") as tmp:
                tmp.write(script)
            os.chmod(tmp.name, 0o755)
            os.replace(tmp.name, wrapper)  # atomic: another process may be running the old one
    except OSError:  # a read-only home: MLX's own compiler command, slower kernels
        return False
    os.environ["PATH"] = os.pathsep.join([str(folder), *path])
    vectorized_kernels = True
    return True
