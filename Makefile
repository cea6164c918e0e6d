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

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/flowers study --profile study-cpu

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .flowers runs
