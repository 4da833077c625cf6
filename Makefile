# Quickstart targets. Each installs what it needs into .venv (created if missing).
# torch is pinned here, not in pyproject: the CPU wheel 2.13.0 must be installed before anything
# that depends on torch, or pip resolves a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: install demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

## make demo: run the whole pipeline on the embedded default config (local Ray, ./runs)
demo: install
	$(PY) -m pipeline run configs/tiny.yaml $(ARGS)

## make test: the test suite (real local Ray, moto S3 server, W&B offline)
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs wandb-offline .pytest_cache
