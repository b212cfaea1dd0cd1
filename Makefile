# Each target installs what it needs on first use, so a fresh machine needs only Python.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-parity install-bench test test-parity demo bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test]'
	touch $@

$(VENV)/.parity: $(VENV)/.installed
	$(PIP) -e '.[test,parity]'
	touch $@

$(VENV)/.bench: $(VENV)/.installed
	$(PIP) -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed
install-parity: $(VENV)/.parity
install-bench: $(VENV)/.bench

test: install
	$(PY) -m pytest -q -n auto -m "not parity"

test-parity: install-parity
	$(PY) -m pytest -q -m parity

demo: install
	$(PY) -m jaxdiff.train --config experiments/digits.py --workdir runs/digits

bench: install-bench
	$(PY) benchmarks/run_all.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
