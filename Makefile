# Each target installs what it needs on first use, so a fresh machine needs only Python.
# The parity tests get their own venv: their torch (2.14.1, for pytorch-fid's torchvision) is not
# the torch 2.13.0 that `bench` measures in `.venv`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PARITY_VENV := .venv-parity
PARITY_PY := $(PARITY_VENV)/bin/python
PIP_INSTALL := -m pip install --quiet --disable-pip-version-check

.PHONY: install install-parity install-bench test test-all test-parity demo bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) -e '.[test]'
	touch $@

$(PARITY_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_PY) $(PIP_INSTALL) -e '.[test,parity]'
	touch $@

$(VENV)/.bench: $(VENV)/.installed
	$(PY) $(PIP_INSTALL) -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed
install-parity: $(PARITY_VENV)/.installed
install-bench: $(VENV)/.bench

# `test` is the fast tier a newcomer runs; `test-all` adds the `slow` tests (the learning runs).
test: install
	$(PY) -m pytest -q -n auto -m "not parity and not slow"

test-all: install
	$(PY) -m pytest -q -n auto -m "not parity"

test-parity: install-parity
	$(PARITY_PY) -m pytest -q -m parity

demo: install
	$(PY) -m jaxdiff.train --config experiments/digits.py --workdir runs/digits

bench: install-bench
	$(PY) benchmarks/run_all.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(PARITY_VENV) runs
