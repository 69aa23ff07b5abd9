# Two set-up commands (README): `make demo` and `make test`. Each creates .venv on first use,
# installs the pinned torch FIRST (so that the package's `torch>=` range is already met), then
# this package with its dev extras. torch comes from the PyTorch CPU index when it answers
# (the CPU build: no multi-GB CUDA download), else from pip's own configuration (this CI
# machine: a local CPU wheel; elsewhere PyPI's build, which runs on a machine without a GPU).
#   make test TORCH_PIP_ARGS="--index-url URL"   use exactly these pip arguments for torch
#   make test TORCH_CPU_INDEX=                    skip the CPU index, plain `pip install torch==...`
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -m hermes.install_check install --pip $(BIN)/pip --pin "$(TORCH_PIN)" \
		--cpu-index "$(TORCH_CPU_INDEX)" --pip-args "$(TORCH_PIP_ARGS)"
	$(BIN)/pip install -q -e ".[dev]"
	# nnU-Net v2, only for its dataset integrity check in the tests. Its dependency
	# dynamic-network-architectures requires timm -> torchvision -> a CUDA torch build, so
	# its other dependencies are installed explicitly and these two without dependencies.
	$(BIN)/pip install -q acvl-utils batchgenerators batchgeneratorsv2 blosc2 einops graphviz \
		imagecodecs pandas requests scikit-image scikit-learn seaborn tifffile yacs
	$(BIN)/pip install -q --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
	# Any build of torch >= the minimum passes (a CUDA build runs on the CPU too).
	$(BIN)/python -m hermes.install_check
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
