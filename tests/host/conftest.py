"""Fixtures for pyvirtd tests: a real daemon (a subprocess) on a temporary state directory."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.images import cached_default_image
from pyvirt.testing.daemon import COUNTER, Daemon, counts, wait_for

__all__ = ["COUNTER", "Daemon", "counts", "wait_for"]     # (also importable from pyvirt.testing.daemon)

@pytest.fixture
def state_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pvd-", dir="/tmp"))     # short: socket paths hold 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[Daemon]:
    if cached_default_image() is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    d = Daemon(state_dir)
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def bare_daemon(state_dir: Path) -> Iterator[Daemon]:
    """A daemon that needs no guest image (the VMs here are never started)."""
    d = Daemon(state_dir)
    try:
        yield d
    finally:
        d.cleanup()


