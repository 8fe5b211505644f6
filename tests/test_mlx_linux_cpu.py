"""What the MLX backend sets up around MLX on a Linux CPU: OpenBLAS without taking PyTorch's BLAS, and a compiler
for MLX's fused kernels that vectorizes them without changing a value."""

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mlx")

from tinylm.backends.mlx import linux_cpu  # noqa: E402  (the backend first: it loads mlx's BLAS)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="set up on Linux only")
with_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++: MLX runs compiled functions unfused")

# Fused kernels of exp, sigmoid, a multiply-add and a division, run compiled (by MLX's compiler command) and
# eagerly (MLX's prebuilt kernels); prints both as hex bytes, and where `g++` resolves.
_FUSED = """
import os, shutil, sys, glob, tempfile
import tinylm.backends.mlx
from tinylm.backends.mlx import linux_cpu
import mlx.core as mx
import numpy as np
x, y, z = (30 * mx.random.normal((1000, 37), key=mx.random.key(i)) for i in range(3))
def f(x, y, z):
    return [mx.exp(x - x.max(axis=-1, keepdims=True)) * mx.sigmoid(y) + z / (1.0 + mx.abs(x)), x * y + z]
compiled, eager = (mx.concatenate(fn(x, y, z)) for fn in (mx.compile(f), f))
mx.eval(compiled, eager)
assert glob.glob(os.path.join(tempfile.gettempdir(), "mlx", "*", "cpu", "*.so")), "no kernel was compiled"
print(linux_cpu.vectorized_kernels, shutil.which("g++"))
print(np.array(compiled).tobytes().hex())
print(np.array(eager).tobytes().hex())
"""


def _run_fused(tmp_path, name, **env):
    cache = tmp_path / name  # a kernel cache of its own: MLX keeps compiled kernels under the temporary directory
    cache.mkdir()
    done = subprocess.run([sys.executable, "-c", _FUSED], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(cache), "TINYLM_CACHE_DIR": str(tmp_path / "home"), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split("\n")[:3]


@linux_only
@with_gxx
def test_kernels_built_to_vectorize_compute_bit_for_bit_what_mlx_own_build_does(tmp_path):
    native, compiler, native_out, native_eager = _run_fused(tmp_path, "native")[0].split() + _run_fused(
        tmp_path, "again")[1:]
    plain_line, plain_out, plain_eager = _run_fused(tmp_path, "plain", TINYLM_NO_NATIVE_KERNELS="1")
    assert native == "True" and compiler == str(tmp_path / "home" / "mlx-cxx" / "g++")
    assert plain_line.split()[0] == "False" and "mlx-cxx" not in plain_line
    assert native_out == plain_out == plain_eager == native_eager
    assert len(native_out) == 2 * 4 * 2000 * 37


@linux_only
@with_gxx
def test_the_compiler_wrapper_calls_the_real_compiler_even_when_it_is_already_first_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(linux_cpu, "vectorized_kernels", False)
    for _ in range(2):  # the second time, as a child process started with this PATH would find it
        assert linux_cpu.use_vectorizing_compiler()
    wrapper = tmp_path / "mlx-cxx" / "g++"
    assert shutil.which("g++") == str(wrapper)
    assert os.environ["PATH"].split(os.pathsep).count(str(wrapper.parent)) == 1
    script = wrapper.read_text()
    assert "mlx-cxx" not in script and all(flag in script for flag in linux_cpu.VECTORIZING_FLAGS)
    version = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout


_OPENBLAS = [path for pattern in linux_cpu.OPENBLAS_PATTERNS for path in glob.glob(pattern)]


@pytest.mark.skipif(not _OPENBLAS, reason="no OpenBLAS to load")
@pytest.mark.parametrize("mlx_first", [True, False])
def test_mlx_imported_before_the_backend_is_said_since_its_blas_is_then_the_slow_one(mlx_first):
    first = "import mlx.core; " if mlx_first else ""
    done = subprocess.run([sys.executable, "-W", "always", "-c", first + "import tinylm.backends.mlx"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("imported before tinylm's MLX backend" in done.stderr) == mlx_first


@pytest.mark.skipif(not _OPENBLAS, reason="no OpenBLAS to load")
def test_torch_keeps_its_own_blas_when_the_mlx_backend_is_loaded_first():
    pytest.importorskip("torch")
    # PyTorch loaded after OpenBLAS had gone global took OpenBLAS's BLAS for its own: other numbers, and
    # threads that fought PyTorch's for the cores.
    steps = ("from tinylm.bench import suite as bench; from tinylm.backends import get_backend; "
             "print(repr(bench.train_throughput(get_backend('torch'), bench.CASES[0][1], 64, 12, 3)[2]))")
    losses = []
    for first in ("", "import tinylm.backends.mlx; "):
        done = subprocess.run([sys.executable, "-c", first + steps], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        losses.append(done.stdout.strip().splitlines()[-1])
    assert losses[0] == losses[1]
