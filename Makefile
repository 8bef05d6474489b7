# Every target does its own set-up on a fresh machine (a venv in .venv, torch, the compiled extension).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# the CUDA build of torch lets nvcc compile and link csrc/*.cu even without a GPU
TORCH   ?= torch==2.14.1
# peers of rlhf_fast.integrations, pinned, for tests/test_integrations_*.py; torch is named again so pip keeps it.
# verl / OpenRLHF pin old transformers / ray / tensordict and GPU-only packages: installed --no-deps with the
# few packages their loss-side modules import (and what verl's ray_trainer imports, for the dispatch test).
PEERS        ?= trl==1.16.0 ray==2.60.0 omegaconf==2.3.1 tensordict==0.15.3 codetiming==1.4.0 hydra-core==1.3.8 \
                orjson==3.13.0 cachetools==8.0.2 uvicorn==0.54.0 fastapi==0.165.0 opentelemetry-api==1.45.2 \
                pylatexenc==2.11 packaging==26.4
PEERS_NODEPS ?= verl==0.9.1 openrlhf==0.11.2 liger-kernel==0.8.5 peft==0.21.2 torchdata==0.11.0 megatron-core==0.16.1
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME

.PHONY: setup demo test bench bench-cpu clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77"

$(VENV)/.deps: $(BIN)/activate
	$(BIN)/pip install -q "$(TORCH)" "numpy<2.4" tqdm safetensors matplotlib tensorboard pytest pytest-benchmark ninja pybind11 transformers
	$(BIN)/pip install -q "$(TORCH)" $(PEERS)
	$(BIN)/pip install -q --no-deps $(PEERS_NODEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py rlhf_fast/_build.py $(wildcard csrc/*)
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
