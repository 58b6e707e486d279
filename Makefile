# Two entry points (see README): `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install

install: $(STAMP)

# torch first, pinned: the CPU wheel on disk here; a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) cli.py run recipes/demo.yaml

# Everything, slow end-to-end tests included (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

# The fast subset for development.
test-fast: $(STAMP)
	$(PY) -m pytest -q
