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
	# nnU-Net v2, only for its dataset integrity check in the tests. Its dependency
	# dynamic-network-architectures requires timm -> torchvision -> a CUDA torch build, so
	# its other dependencies are installed explicitly and these two without dependencies.
	$(BIN)/pip install -q acvl-utils batchgenerators batchgeneratorsv2 blosc2 einops graphviz \
		imagecodecs pandas requests scikit-image scikit-learn seaborn tifffile yacs
	$(BIN)/pip install -q --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
	$(BIN)/python -c "import torch; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"
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
