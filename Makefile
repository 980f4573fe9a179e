# rtdmd-bench: install, test, demo.  Variables: PYTHON (interpreter for the venv), VENV (its directory),
# TORCH (the torch requirement installed first), TORCH_PIP_ARGS (e.g. --index-url https://download.pytorch.org/whl/cpu).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
DEMO_OUT ?= outputs/demo

.PHONY: install test demo

# torch first, so that the project's `torch>=2.4` is already satisfied by the CPU build
# and pip does not pull a CUDA build (GPU users install their CUDA build instead).
install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH_PIP_ARGS) '$(TORCH)'
	$(BIN)/python -m pip install -e '.[test]'

test:
	$(BIN)/python -m pytest

# The shipped shapes teacher (28 Euler steps, CFG 4) on a few GenEval-style prompts.
demo:
	$(BIN)/rtdmd-bench sample --out $(DEMO_OUT) --num-images 4 \
		--prompt "a photo of a red circle" \
		--prompt "a photo of three blue squares" \
		--prompt "a photo of a green triangle left of a yellow cross"
