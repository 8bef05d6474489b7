# Every target does its own set-up on a fresh machine (a venv in .venv, torch, the compiled extension).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# the CUDA build of torch lets nvcc compile and link csrc/*.cu even without a GPU
TORCH   ?= torch==2.14.1
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME

.PHONY: setup demo test bench bench-cpu clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.deps: $(BIN)/activate
	$(BIN)/pip install -q "$(TORCH)" "numpy<2.4" tqdm safetensors matplotlib tensorboard pytest pytest-benchmark ninja pybind11 transformers
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.built

demo: setup   ## the main job on its built-in default: the whole pipeline on a tiny model
	$(BIN)/rlhf-fast pipeline

test: setup   ## the test suite (Triton kernels under TRITON_INTERPRET=1 on the CPU)
	$(BIN)/python -m pytest tests -q

bench: setup  ## the full benchmark matrix (on a GPU machine: benchmarks/gpu_run.sh)
	$(BIN)/python -m benchmarks

bench-cpu: setup  ## small CPU benchmark of every op (about a minute)
	$(BIN)/python -m benchmarks --cpu

clean:
	rm -rf $(VENV) build *.egg-info rlhf_fast/*.so
