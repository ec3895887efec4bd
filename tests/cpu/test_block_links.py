"""Direct jumps between the native blocks of one page (Engine._link): an exit to a pc in the
block's own page goes straight to the block there, through its linked entry, which still
returns to Python when the chaining budget is spent; a write to the page drops the links
with the blocks; code placed from the code cache links the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirt.clock import Clock
from pyvirt.cpu.riscv import codecache, native
from pyvirt.cpu.riscv.codecache import CodeCache
from pyvirt.cpu.riscv.decode import decode
from pyvirt.cpu.riscv.engine import Engine
from pyvirt.cpu.riscv.hart import Hart
from pyvirt.memory import Bus

pytestmark = pytest.mark.skipif(not native.available(), reason="the native engine needs x86-64 Linux")

BASE = 0x8000_0000
A, B = BASE + 0x40, BASE + 0x800          # two blocks of one page
SPIN = 0x0000006F                          # jal x0, 0
WFI = 0x10500073                           # (not native: its block leaves for Python)
LIMIT = 3 * native.CHAIN_BUDGET // 2      # loop iterations before the spin


def addi(rd: int, rs1: int, imm: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (rd << 7) | 0x13


def branch(funct3: int, rs1: int, rs2: int, off: int) -> int:
    o = off & 0x1FFF
    return ((o >> 12 & 1) << 31 | (o >> 5 & 0x3F) << 25 | rs2 << 20 | rs1 << 15 | funct3 << 12
            | (o >> 1 & 0xF) << 8 | (o >> 11 & 1) << 7 | 0x63)


def loop_program(bus: Bus, end: int = SPIN) -> None:
    """A: x5 += 1; if x5 != x7 goto B; spin (`end`).   B: x6 += 1; goto A (beq x0, x0).
    Each block's only way on is a side exit into the other: two blocks, two links."""
    for at, w in ((A, addi(5, 5, 1)), (A + 4, branch(1, 5, 7, B - (A + 4))), (A + 8, end),
                  (B, addi(6, 6, 1)), (B + 4, branch(0, 0, 0, A - (B + 4))), (B + 8, SPIN)):
        bus.write(at, 4, w)


def machine(cache: CodeCache | None = None, end: int = SPIN) -> tuple[Bus, Engine, Hart]:
    bus = Bus(BASE, 1 << 20)
    loop_program(bus, end)
    eng = Engine(bus, "native", code_cache=cache)
    h = Hart(0, bus, Clock(), native_regs=True)
    eng.add_hart(h)
    h.x[7] = LIMIT
    h.pc = A
    return bus, eng, h


def test_the_blocks_of_a_page_jump_straight_to_each_other() -> None:
    """A is made first (its exit to B waits), then B (which links to A at once and takes
    A's waiting exit).  With the jump table and fetch table emptied -- the chain stub can
    then chain nowhere -- one call from Python still runs the loop natively until the
    chaining budget is spent, and no further: the linked entry checks it (else the loop
    would run on to its end, a wfi, which leaves for Python)."""
    _, eng, h = machine(end=WFI)
    eng.run(h, 100)
    assert eng.stats["links"] == 2
    waiting = {k for k, v in eng.links[A >> 12].items() if v}       # the fall-throughs to the spins
    assert waiting == {(3, (A + 8) & 0xFFF), (3, (B + 8) & 0xFFF)}
    assert eng.jumps is not None
    eng.jumps.clear()
    h.set_priv(h.priv)                        # (drops the native fetch table's entries)
    x5 = h.x[5]
    ran = eng.run(h, 1)                       # one block entered from Python
    assert native.CHAIN_BUDGET <= ran < native.CHAIN_BUDGET + 4, ran
    assert abs(4 * (h.x[5] - x5) - ran) <= 4 and h.x[6] in (h.x[5], h.x[5] - 1)     # 4 instructions a turn


def test_the_loop_ends_where_the_interpreter_ends_it() -> None:
    _, eng, h = machine()
    for _ in range(20):
        eng.run(h, 10_000)
    assert h.pc == A + 8 and h.x[5] == LIMIT and h.x[6] == LIMIT - 1


def test_a_write_to_the_page_drops_the_links_with_the_blocks() -> None:
    """B rewritten (x6 += 2) after both blocks linked: the next run executes the new B,
    whatever the old A's exit pointed at; the page's waiting exits are gone too."""
    bus, eng, h = machine()
    eng.run(h, 100)
    assert eng.stats["links"] == 2
    bus.write(B, 4, addi(6, 6, 2))
    assert A >> 12 not in eng.links and not eng.shared
    h.pc = A
    x5, x6 = h.x[5], h.x[6]
    eng.run(h, 4000)
    assert h.x[6] - x6 in (2 * (h.x[5] - x5), 2 * (h.x[5] - x5) - 2) and h.x[5] - x5 > 500
    assert eng.stats["links"] == 4                   # (made again for the new blocks)


def test_exits_to_another_page_are_not_linked() -> None:
    bus = Bus(BASE, 1 << 20)
    a, b = BASE + 0xFF0, BASE + 0x1010
    bus.write(a, 4, addi(5, 5, 1))
    bus.write(a + 4, 4, branch(0, 0, 0, b - (a + 4)))
    bus.write(b, 4, addi(6, 6, 1))
    bus.write(b + 4, 4, branch(0, 0, 0, a - (b + 4)))
    eng = Engine(bus, "native")
    h = Hart(0, bus, Clock(), native_regs=True)
    eng.add_hart(h)
    h.pc = a
    eng.run(h, 5000)
    assert eng.stats["links"] == 0 and h.x[5] > 1000          # (chained through the stub)


def test_direct_exits_name_every_exit_to_a_fixed_pc_in_the_page() -> None:
    """The translator marks, and `direct_exits` reads back, the side exit and the
    fall-through of a branch in the page; not an exit whose pc the guest computes (jalr)
    nor one into the next page."""
    words = [addi(5, 5, 1), branch(1, 5, 7, 0x100), 0x00008067]     # ...; bne +0x100; ret (jalr)
    pc = BASE + 0x200
    t = native.Translator()
    insns = [(decode(w), pc + 4 * i) for i, w in enumerate(words)]
    assert t.translate(insns, 3) is not None
    code, far = t.last
    assert sorted(k for _, k in native.direct_exits(code, far)) == [4 + 0x100]
    assert all(native.far_jump_fits(o, len(code)) for o in far)
    assert len([o for o in far if not o & native.LINK]) >= 1           # the jalr's
    last = BASE + 0xFF8
    insns = [(decode(addi(5, 5, 1)), last), (decode(addi(5, 5, 1)), last + 4)]
    t.translate(insns, 3)
    assert native.direct_exits(*t.last) == []                          # runs off into the next page


def test_a_damaged_link_mark_is_refused() -> None:
    assert native.far_jump_fits(20 | native.LINK, 40)
    assert not native.far_jump_fits(8 | native.LINK, 40)               # no room for its mov before it
    assert not native.far_jump_fits(38, 40)


def test_code_placed_from_the_cache_links_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codecache, "MIN_NEW", 1)
    results = []
    for _ in range(2):
        cache = CodeCache(tmp_path)
        _, eng, h = machine(cache)
        for _ in range(20):
            eng.run(h, 10_000)
        eng.close()
        results.append((h.x[5], h.x[6], h.pc, eng.stats["links"], cache.stats["hits"]))
    # A -> B, B -> A, A -> the spin (made last), the spin -> itself (its loop's way out)
    assert results[0][:4] == results[1][:4] == (LIMIT, LIMIT - 1, A + 8, 4)
    assert results[0][4] == 0 and results[1][4] >= 2
