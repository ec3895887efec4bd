"""rdtime in native code: the VM clock's ticks without leaving native code, and the
counter-enable rules (mcounteren.TM below M-mode, scounteren.TM in U-mode) as csr.py has them."""

from __future__ import annotations

import pytest

from pyvirt.clock import Clock
from pyvirt.cpu.riscv import native
from pyvirt.cpu.riscv.engine import Engine
from pyvirt.cpu.riscv.hart import Hart
from pyvirt.memory import Bus

pytestmark = pytest.mark.skipif(not native.available(), reason="the native engine needs an x86-64 host")

BASE = 0x8000_0000
TRAP = BASE + 0x800
ILLEGAL_INSN = 2


def csrrs(rd: int, csr: int, rs1: int = 0) -> int:
    return csr << 20 | rs1 << 15 | 2 << 12 | rd << 7 | 0x73


LOOP = 0x0000006F                                   # jal x0, 0


def machine(engine: str, priv: int, mcounteren: int, scounteren: int = 0) -> tuple[Hart, Engine, Clock]:
    bus = Bus(BASE, 1 << 20)
    for i, w in enumerate((csrrs(5, 0xC01), csrrs(6, 0xC01), LOOP)):
        bus.write(BASE + 4 * i, 4, w)
    bus.write(TRAP, 4, LOOP)
    clock = Clock()
    eng = Engine(bus, engine)
    h = Hart(0, bus, clock, native_regs=engine == "native")
    eng.add_hart(h)
    h.mtvec = TRAP
    h.set_priv(priv)
    h.mcounteren, h.scounteren = mcounteren, scounteren
    h.pc = BASE
    return h, eng, clock


@pytest.mark.parametrize("priv", [0, 1, 3])
def test_native_rdtime_reads_the_clock_without_python(priv: int) -> None:
    h, eng, clock = machine("native", priv, mcounteren=2, scounteren=2)
    ticks = clock.ticks
    before = ticks()

    def no_python() -> int:
        raise AssertionError("rdtime left native code")
    clock.ticks = no_python                         # type: ignore[method-assign]
    eng.run(h, 40)
    after = ticks()
    assert before <= h.x[5] <= h.x[6] <= after and h.pc in (BASE + 8, BASE)
    assert eng.native is not None and eng.native.stats["native_blocks"] >= 1
    clock.load({"ticks": 5 * 10**9})                # a restored clock: native code follows it
    h.pc = BASE
    eng.run(h, 40)
    assert 5 * 10**9 <= h.x[5] <= h.x[6] < 5 * 10**9 + 10 * clock.hz


@pytest.mark.parametrize("engine", ["native", "jit", "interp"])
@pytest.mark.parametrize(("priv", "mcounteren", "scounteren"), [(1, 0, 2), (0, 0, 2), (0, 2, 0)])
def test_rdtime_without_tm_is_an_illegal_instruction(engine: str, priv: int, mcounteren: int,
                                                     scounteren: int) -> None:
    h, eng, _ = machine(engine, priv, mcounteren, scounteren)
    eng.run(h, 40)
    assert (h.priv, h.mcause, h.mepc, h.mtval) == (3, ILLEGAL_INSN, BASE, csrrs(5, 0xC01))
    assert h.x[5] == 0


def test_a_write_to_time_stays_illegal_natively() -> None:
    """csrrs rd, time, rs1 with rs1 != x0 writes a read-only CSR: not a native rdtime."""
    h, eng, _ = machine("native", 1, mcounteren=2)
    h.bus.write(BASE, 4, csrrs(5, 0xC01, rs1=7))
    eng.run(h, 40)
    assert (h.mcause, h.mepc, h.mtval) == (ILLEGAL_INSN, BASE, csrrs(5, 0xC01, rs1=7))


def test_a_paused_clock_leaves_rdtime_to_python() -> None:
    h, eng, clock = machine("native", 1, mcounteren=2)
    clock.pause()
    eng.run(h, 40)
    assert h.x[5] == h.x[6] == clock.ticks()
