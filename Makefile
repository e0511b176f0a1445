# Conventional entry points. Every target creates .venv when it is missing and installs the CPU
# build of torch *before* the package: a plain `torch` requirement would pull GBs of CUDA wheels.
# DeepSpeed (in the dev set) builds its setup against that torch; DS_BUILD_OPS=0 compiles no op at install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup quickstart test quality format benchmarks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(BIN)/hf-align quickstart

test: setup
	$(BIN)/python -m pytest -q tests

quality: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The benchmarks' smoke runs (seconds to minutes; the full runs are in the README): each is a module of `benchmarks`.
benchmarks: setup
	$(BIN)/python -m benchmarks.masked_dpo --quick --repeats 1 --steps 1 --output /tmp/hf-align-masked_dpo_quick.json
	$(BIN)/python -m benchmarks.gpu --tiny --out /tmp/hf-align-gpu_tiny.json
	$(BIN)/python -m benchmarks.fidelity --quick

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
