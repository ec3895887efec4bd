# pyvirt: `make run` boots the default VM, `make test` runs the whole test suite.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test setup system lint image clean

run: setup
	$(VENV)/bin/pyvirt image build
	$(VENV)/bin/pyvirt run

test: setup
	$(VENV)/bin/pyvirt image build
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

clean:
	rm -rf $(VENV) build src/*.egg-info
