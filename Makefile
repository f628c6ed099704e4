# Quick start (a fresh machine needs only python3 >= 3.11 and access to PyPI):
#   make demo    # installs into .venv, runs the offline distillation demo, prints the table
#   make test    # installs into .venv, runs the test suite
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= /tmp/clipdistill_demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[export,dev,litert]"
	touch $(STAMP)

demo: $(STAMP)
	JAX_COMPILATION_CACHE_DIR=$(VENV)/jax_cache $(PY) -m clipdistill_jax.main \
	  --config configs/demo.py --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check clipdistill_jax configs scripts tests

clean:
	rm -rf $(VENV)
