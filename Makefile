# pyvirt: `make run` boots the default VM, `make test` runs the whole test suite,
# `make check` the fast static checks (no root, no guest builds; `make test` runs them too).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: run test check setup system lint image clean pypy-setup pypy-test fuzz
PYPY_VENV := .venv-pypy

run: setup
	$(VENV)/bin/pyvirt image build
	$(VENV)/bin/pyvirt run

test: setup check
	$(VENV)/bin/pyvirt image build
	$(VENV)/bin/pyvirt image build debian
	$(VENV)/bin/python -m pytest -q

# The code's house style (aligned end-of-line comments, hand-wrapped argument lists) is not
# ruff format's, so the format check covers the files already in ruff format's style: a ratchet
# (add a file once it is formatted; never reformat a whole tree others are editing).
FORMATTED := src/pyvirt/clock.py src/pyvirt/compat.py src/pyvirt/engines.py src/pyvirt/errors.py \
	src/pyvirt/fsutil.py src/pyvirt/cpu/riscv/traps.py src/pyvirt/devices/base.py \
	src/pyvirt/devices/virtio/rng.py src/pyvirt/images/cache.py src/pyvirt/testing/clock.py \
	src/pyvirt/vmm/console.py src/pyvirt/version.py src/pyvirt/host/errors.py \
	src/pyvirt/machine/interface.py src/pyvirt/vmm/resources.py src/pyvirt/vmm/restore.py \
	src/pyvirt/vmm/snapfiles.py src/pyvirt/state.py src/pyvirt/vmm/snapcheck.py \
	tests/cpu/conftest.py src/pyvirt/testing/virtio_rig.py tests/devices/test_state_schemas.py \
	tests/machine/test_interface.py tests/vmm/test_resources.py tests/repo

# Static checks only, in seconds: ruff, ruff format on FORMATTED, mypy on src (settings in
# pyproject.toml), and the repository tests (document paths, import layering).
check: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check $(FORMATTED)
	$(VENV)/bin/mypy
	PYTHONPATH=src $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/repo   # (this tree, whatever the venv points at)

# Every fuzz target (fuzz/targets.py) under atheris for FUZZ_SECONDS each, with memory and
# per-input time limits; crashes land in fuzz/crashes/ (FUZZING.md).  `make test` runs a short one.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	for t in $$(PYTHONPATH=src $(VENV)/bin/python fuzz/run.py --list); do \
		PYTHONPATH=src $(VENV)/bin/python fuzz/run.py $$t --seconds $(FUZZ_SECONDS) || exit 1; done

setup: system $(STAMP)

system:
	./scripts/setup-system.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: check

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
