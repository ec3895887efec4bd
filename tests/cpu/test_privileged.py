"""The privileged architecture on bare metal: self-checking M-mode programs (tests/cpu/bare/)
run on every engine, and on qemu-system-riscv64's spike machine as a cross-check of their
expectations.  Each program counts its failed checks and prints them through HTIF; it
reports 0 through tohost when all pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirt.testing import asm
from pyvirt.testing.baremetal import BareRunResult, run_bare

BARE = Path(__file__).parent / "bare"

# program name -> its variants (defines)
PROGRAMS: dict[str, list[dict[str, int]]] = {
    "traps": [{}],
    "paging": [{"SATP_MODE": 8}, {"SATP_MODE": 9}],
    "interrupts": [{}],
    "blockfault": [{}],
    "illegal_tval": [{}],
    "sstatus": [{}],
    "asid": [{}],
}

# Programs that find CPU bugs: expected to fail on pyvirt until they are fixed (QEMU passes).


def build(name: str, defines: dict[str, int] | None = None) -> Path:
    return asm.bare_elf(asm=[(BARE / "rt.S").read_text()],
                        c=[(BARE / "lib.c").read_text(), (BARE / f"{name}.c").read_text()],
                        headers={"bare.h": (BARE / "bare.h").read_text()}, defines=defines)


CASES = [pytest.param(name, d, id=name + "".join(f"-{k.lower()}{v}" for k, v in d.items()))
         for name, variants in PROGRAMS.items() for d in variants]


@pytest.mark.parametrize("name, defines", CASES)
def test_program(name: str, defines: dict[str, int], engine: tuple[str, int],
                 request: pytest.FixtureRequest) -> None:
    r = run_bare(build(name, defines), engine=engine[0], hot=engine[1])
    assert r.hart is not None
    assert r.hart.csr_read(0xF12) == 0, "the programs tell QEMU (marchid != 0) from pyvirt by marchid"
    assert r.exit_code == 0, f"exit {r.exit_code}:\n{r.console.decode(errors='replace')}"


@pytest.mark.parametrize("name, defines", CASES)
def test_program_on_qemu(name: str, defines: dict[str, int], toolchain: None) -> None:
    why = asm.qemu_system_missing()
    if why:
        pytest.skip(why)
    q = asm.run_qemu_spike(build(name, defines))
    assert q.exit_code == 0, f"exit {q.exit_code}:\n{q.console.decode(errors='replace')}"


def _trap_state(r: BareRunResult, elf: Path) -> list[bytes]:
    """Registers and trap records saved by the M handler at both faults."""
    assert r.hart is not None
    syms = asm.symbols(elf)
    bus = r.hart.bus
    return [bus.read_bytes(syms[name], size) for name, size in
            (("first_frame", 256), ("first_rec", 48), ("last_frame", 256), ("m_rec", 48))]


def test_fault_in_translated_block_matches_interpreter(engine: tuple[str, int]) -> None:
    """The registers and trap record at a fault inside a hot block (M access fault, then an S
    store page fault under Sv39) are the interpreter's, byte for byte."""
    elf = build("blockfault")
    ref = run_bare(elf, engine="interp")
    assert ref.exit_code == 0, ref.console.decode(errors="replace")
    r = run_bare(elf, engine=engine[0], hot=engine[1])
    assert r.exit_code == 0, r.console.decode(errors="replace")
    assert _trap_state(r, elf) == _trap_state(ref, elf)
    assert r.regs == ref.regs
