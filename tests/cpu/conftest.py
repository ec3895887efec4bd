"""CPU tests: every engine tier, compared against qemu-riscv64 (user programs) or self-checking
bare-metal programs.

Fixtures:
* `engine` -- (engine, hot) over the interpreter, the Python translator with
  blocks translated at once (hot=1) and on their second run (hot=2), and the
  native tier where the host has it.
* `check_user` -- runs a user ELF under qemu-riscv64 and pyvirt and asserts
  that exit codes and the byte-for-byte dumps agree.
* `toolchain` -- skips when the cross toolchain or qemu-user is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirt.cpu.riscv import native
from pyvirt.testing import asm
from pyvirt.testing.usermode import UserRunResult, run_elf

ENGINES = [("interp", 2), ("jit", 1), ("jit", 2)] + ([("native", 1)] if native.available() else [])
ENGINE_IDS = [e if e == "interp" else f"{e}-hot{h}" for e, h in ENGINES]


@pytest.fixture(scope="session", autouse=True)
def _asm_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    asm.set_cache_dir(tmp_path_factory.mktemp("asm"))


@pytest.fixture(scope="session")
def toolchain() -> None:
    why = asm.toolchain_missing()
    if why:
        pytest.skip(why)


@pytest.fixture(params=ENGINES, ids=ENGINE_IDS)
def engine(request: pytest.FixtureRequest, toolchain: None) -> tuple[str, int]:
    return request.param


CheckUser = Callable[..., UserRunResult]


@pytest.fixture
def check_user(engine: tuple[str, int]) -> CheckUser:
    """`check_user(elf, bufsize=8192)`: qemu and pyvirt must exit 0 with identical stdout."""

    def check(elf: Path, bufsize: int = 8192, max_instructions: int = 20_000_000) -> UserRunResult:
        q = asm.run_qemu_user(elf)
        assert q.returncode == 0, f"qemu-riscv64 exit {q.returncode}: {q.stderr.decode(errors='replace')}"
        r = run_elf(elf, engine=engine[0], hot=engine[1], max_instructions=max_instructions)
        assert r.fault is None, "pyvirt faulted: mcause={:#x} mepc={:#x} mtval={:#x}".format(*r.fault)
        assert r.exit_code == 0
        assert r.stdout == q.stdout, asm.describe_difference(r.stdout, q.stdout, bufsize)
        return r

    return check
