# Two commands do everything on a fresh clone:
#   make run   - create .venv if missing, install, run the main job (the study) on embedded defaults
#   make test  - create .venv if missing, install, run the test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real Flowers-102 next to the checkout is used when present; otherwise set FLOWERS_DATA
# or run `flowers data download`.
FLOWERS_DATA ?= $(shell [ -f ../shared/flowers102/imagelabels.mat ] && cd ../shared/flowers102 && pwd)
export FLOWERS_DATA
# glibc returns big tensors to the kernel on every batch; these keep them (see flowers/runtime.py)
export MALLOC_MMAP_THRESHOLD_ := 1000000000000
export MALLOC_TRIM_THRESHOLD_ := 100000000000

.PHONY: run test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is installed first, pinned, from TORCH_INDEX_URL when set. PyPI's default torch for Linux
# x86_64 is the CUDA build: measured 2026-12-06 on a fresh clone, `make install` made a 7.0 GB .venv
# (3.2 GB nvidia libraries, 0.9 GB triton) in 2 min from a local wheel cache. Without a GPU, the CPU
# wheels are enough:  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu make install
# (not measured here: that index is not reachable from this project's machines).
TORCH_INDEX_URL ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/flowers study --profile study-cpu

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .flowers runs
