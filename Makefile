# Entry points, each self-installing into a virtual environment:
#   make demo   -- the embedded offline demo (tiny models, real digits data, CPU)
#   make test   -- lint, then the whole test suite (what CI runs)
#   make test-fast -- the suite without tests marked slow, for the edit-run loop
#   make lint   -- ruff check + ruff format --check;  make format -- apply ruff's fixes and formatting
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# torch first and pinned, so pip takes the local CPU build rather than a multi-GB CUDA one.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) recipes/demo.py --output_dir outputs/demo

LINTED := saft_hf recipes tests benchmarks

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)

test: lint
	HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q -x -p no:cacheprovider

test-fast: $(STAMP)
	HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q -x -p no:cacheprovider -m "not slow"
