# pyvirt: `make run` boots the default VM, `make test` runs the whole test suite.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test setup system lint image clean pypy-setup pypy-test
PYPY_VENV := .venv-pypy

run: setup
	$(VENV)/bin/pyvirt image build
	$(VENV)/bin/pyvirt run

test: setup
	$(VENV)/bin/pyvirt image build
	$(VENV)/bin/pyvirt image build debian
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/python -m pytest -q

setup: system $(STAMP)

system:
	./scripts/setup-system.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests bench

image: setup
	$(VENV)/bin/pyvirt image build

# PyPy (Debian's pypy3): its own environment beside the CPython one.
pypy-setup: $(PYPY_VENV)/.installed

$(PYPY_VENV)/.installed: pyproject.toml
	./scripts/setup-system.sh --pypy
	pypy3 -m venv $(PYPY_VENV)
	$(PYPY_VENV)/bin/pip install -q --upgrade pip
	$(PYPY_VENV)/bin/pip install -q --prefer-binary -e '.[dev]'   # wheels where they exist for PyPy
	touch $@

pypy-test: pypy-setup image
	$(PYPY_VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(PYPY_VENV) build src/*.egg-info
