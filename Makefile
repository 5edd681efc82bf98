# Two commands on a fresh Linux machine with only Python: `make test` and `make demo`.
#
# Two release stacks, each in its own virtual environment (README, "Supported versions"):
#   make lint          ruff's lint rules and format check (pyproject.toml), the first step of `make test`
#   make test          the newest releases, pinned as the registry served them on 2026-12-02
#                      (torch pins its Triton; numpy and the test tools resolve to their newest)
#   make test-oldest   the oldest combination pyproject.toml declares (the GPU machines' releases)
# `TORCH_SPEC=torch==2.13.0 make test` takes another torch (and the torchvision matching it).
PYTHON ?= python3
VENV ?= .venv
OLDEST_VENV ?= .venv-oldest
NEWEST_TORCH := torch==2.15.0
TORCH_SPEC ?= $(NEWEST_TORCH)
TORCHVISION_SPEC ?= $(if $(filter $(NEWEST_TORCH),$(TORCH_SPEC)),torchvision==0.29.2,torchvision)
# Empty: the Triton that torch pins (or, for a torch without one, the newest).
TRITON_SPEC ?=
# numpy<2.4 only for Triton 3.6's interpreter, which breaks on numpy 2.4.
OLDEST_SPECS ?= torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4"
PYTEST ?= -m pytest -q -ra tests

.PHONY: test test-oldest lint demo install install-oldest clean

# One pip call per stack, so the resolver sees every pin together; reinstalls when the pins change.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)" $(TRITON_SPEC) -e ".[test]"
	touch $@

$(OLDEST_VENV)/.installed: pyproject.toml Makefile
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q $(OLDEST_SPECS) -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-oldest: $(OLDEST_VENV)/.installed

# ruff (pyproject.toml, [tool.ruff]): the lint rules, then the formatter's check; `make test` runs both first.
lint: $(VENV)/.installed
	$(VENV)/bin/python -m ruff check .
	$(VENV)/bin/python -m ruff format --check .

test: lint
	$(VENV)/bin/python $(PYTEST)

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python $(PYTEST)

demo: $(VENV)/.installed
	$(VENV)/bin/python examples/demo.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info .pytest_cache
