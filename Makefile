# Two set-up commands (README): `make demo` and `make test`. Each creates .venv on first use,
# installs the pinned CPU build of torch FIRST (a plain `torch` requirement would pull a
# multi-GB CUDA build), then this package with its dev extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hermes demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check hermes tests bench
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check hermes tests bench

clean-venv:
	rm -rf $(VENV)
