#!/usr/bin/env bash
# Installs tinylm and its dependencies into the current Python environment.
#   scripts/setup.sh PYTHON TORCH_SPEC EXTRAS
set -euo pipefail
python=${1:-python3}
torch_spec=${2:-torch==2.13.0}
extras=${3:-torch,mlx,dev}

# On Linux, MLX's CPU wheel runs matmuls on a reference BLAS; Debian's OpenBLAS makes them 30-80x faster.
# tinylm loads it before MLX when it is installed. Best effort: skipped without apt-get or root.
if [[ "$(uname -s)" == "Linux" && "$extras" == *mlx* ]] && command -v apt-get >/dev/null \
   && [[ $(id -u) -eq 0 ]] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so* >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 \
    || echo "note: could not install libopenblas0-pthread; MLX on CPU will be slow" >&2
fi

"$python" -m pip install -q --disable-pip-version-check "$torch_spec"
"$python" -m pip install -q --disable-pip-version-check -e ".[$extras]" "$torch_spec"
