# Two commands on a fresh Linux machine with only Python: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine with an NVIDIA driver take the registry's CUDA build of torch, otherwise the CPU build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# The Triton release of the GPU machines we test on; the CPU tests run its interpreter.
TRITON_SPEC ?= triton==3.6.0

.PHONY: test demo install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q "$(TRITON_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -ra tests

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
