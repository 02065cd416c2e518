# minikv: `make run` and `make test` work on a fresh machine with Python >= 3.10 and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  := weights/smollm2-135m-instruct
PROMPT ?= Explain in two sentences why the sky is blue.
# Machines without an NVIDIA GPU get a pinned torch (a CPU build where the index has one);
# GPU machines get the regular wheel.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.5,torch==2.13.0)

.PHONY: setup setup-test weights data run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

$(MODEL)/model.safetensors: | $(VENV)/.installed
	$(BIN)/minikv weights --out $(MODEL)

# KV-quantization calibration (channel order, clip ratios, K/V norms) from text the model writes itself.
$(MODEL)/kv_calibration.json: $(MODEL)/model.safetensors
	$(BIN)/minikv calibrate -m $(MODEL) --device cpu

weights: $(MODEL)/model.safetensors $(MODEL)/kv_calibration.json

data: | $(VENV)/.installed
	$(BIN)/python -m minikv.textdata --out data

run: weights
	$(BIN)/minikv run --chat -p "$(PROMPT)"

test: setup-test weights
	$(BIN)/python -m pytest -q

bench: weights
	$(BIN)/minikv bench

clean:
	rm -rf $(VENV) build *.egg-info
