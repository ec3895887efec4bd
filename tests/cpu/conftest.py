"""CPU tests: every engine, compared against qemu-riscv64."""

from __future__ import annotations

import pytest

from pyvirt.cpu.riscv import native
from pyvirt.testing.guestprog import toolchain_missing

# (engine, hot): the interpreter, Python blocks translated at once and after a
# second run, and the native tier (translated at once) where the host has it.
ENGINES = [("interp", 2), ("jit", 1), ("jit", 2)] + ([("native", 1)] if native.available() else [])


@pytest.fixture(params=ENGINES, ids=[f"{e}-hot{h}" for e, h in ENGINES])
def engine(request: pytest.FixtureRequest) -> tuple[str, int]:
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _toolchain() -> None:
    why = toolchain_missing()
    if why:
        pytest.skip(why)
