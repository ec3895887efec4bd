"""Fixtures for tests that boot the default guest."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from pyvirt.images import cached_default_image


@dataclass
class Run:
    code: int
    out: str
    err: str


def pyvirt(*args: str, timeout: float = 600, stdin: bytes | None = None) -> Run:
    p = subprocess.run([sys.executable, "-m", "pyvirt", *args], input=stdin or b"",
                       capture_output=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return Run(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


@pytest.fixture(scope="session")
def default_image():
    img = cached_default_image()
    if img is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    return img


# Boots run on the native and jit engines, or on the one PYVIRT_ENGINE forces.
_ENGINES = os.environ.get("PYVIRT_TEST_ENGINES") or os.environ.get("PYVIRT_ENGINE") or "native,jit"


@pytest.fixture(params=_ENGINES.split(","))
def engine(request: pytest.FixtureRequest) -> str:
    return request.param
