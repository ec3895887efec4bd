"""The dirty-page log (memory.py) sees every store of every engine tier: a bare-metal writer
(tests/cpu/bare/dirty.c) stores to random pages in M-mode and in S-mode under Sv39 with every
kind of store; between slices the test compares RAM with its copy from the last harvest, and
every page that changed must be in the harvest.  The same comparison with the CPU's hook
switched off must fail, or the test would prove nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirt.clock import Clock
from pyvirt.cpu.riscv.engine import Engine
from pyvirt.cpu.riscv.hart import Hart
from pyvirt.errors import ConfigError
from pyvirt.machine.elf import parse_elf
from pyvirt.memory import Bus
from pyvirt.testing import asm

BARE = Path(__file__).parent / "bare"
RAM = 0x8000_0000
SIZE = 16 << 20


def build() -> Path:
    return asm.bare_elf(asm=[(BARE / "rt.S").read_text()],
                        c=[(BARE / "lib.c").read_text(), (BARE / "dirty.c").read_text()],
                        headers={"bare.h": (BARE / "bare.h").read_text()})


def changed_pages(old: bytes, new: bytes) -> set[int]:
    return {i for i in range(len(old) >> 12) if old[i << 12:(i + 1) << 12] != new[i << 12:(i + 1) << 12]}


def run_writer(engine: tuple[str, int], hooked: bool = True) -> list[tuple[set[int], set[int]]]:
    """(pages changed, pages harvested) for each of several slices of the writer."""
    image = parse_elf(build().read_bytes(), "dirty")
    bus = Bus(RAM, SIZE)
    for seg in image.segments:
        bus.write_bytes(seg.paddr, seg.data)
    hart = Hart(0, bus, Clock(), native_regs=engine[0] == "native")
    eng = Engine(bus, engine[0], hot=engine[1])
    eng.add_hart(hart)
    if not hooked:
        bus.remove_log_hook(eng.drop_write_entries)
    hart.pc = image.entry
    eng.run(hart, 200_000)                # warm up: TLB entries exist before the log starts
    bus.start_dirty_log()
    copy = bytes(bus.ram[:SIZE])
    rounds = []
    for _ in range(6):
        eng.run(hart, 150_000)
        now = bytes(bus.ram[:SIZE])
        rounds.append((changed_pages(copy, now), bus.harvest_dirty()))
        copy = now
    return rounds


def test_every_store_is_logged(engine: tuple[str, int]) -> None:
    rounds = run_writer(engine)
    for changed, logged in rounds:
        assert len(changed) > 20, "the writer did not run"
        assert not changed - logged, f"written but not logged: {sorted(changed - logged)[:10]}"
        # The log is precise enough to be useful: a page is logged when a write TLB entry was
        # made for it, so it holds little more than what changed.
        assert len(logged) < 2 * len(changed) + 64


def test_without_the_tlb_hook_writes_are_missed(engine: tuple[str, int]) -> None:
    rounds = run_writer(engine, hooked=False)
    assert any(changed - logged for changed, logged in rounds)


def test_bus_writers_mark_and_harvest_clears() -> None:
    bus = Bus(RAM, 1 << 20)
    with pytest.raises(ConfigError):
        bus.harvest_dirty()
    bus.write(RAM + 0x3000, 8, 1)                 # no log: nothing recorded
    bus.start_dirty_log()
    assert bus.dirty_log is not None and len(bus.dirty_log) == 256
    bus.write(RAM + 0x1FFC, 8, -1)                # crosses into page 2
    bus.write_bytes(RAM + 0x5000, b"x" * 0x2001)  # pages 5, 6, 7
    bus.dma_written(RAM + 0xF_F000, 0x10_0000)    # the last page; the rest is past RAM
    assert bus.harvest_dirty() == {1, 2, 5, 6, 7, 255}
    assert bus.harvest_dirty() == set()
    assert len(bus.dirty_log) == 256
    bus.stop_dirty_log()
    assert bus.dirty_log is None


@given(spans=st.lists(st.tuples(st.integers(0, 0x1_0000 - 1), st.integers(0, 0x3000)), max_size=12),
       watched=st.sets(st.integers(0, 15), max_size=6), logging=st.booleans())
def test_a_scatter_list_written_at_once_tells_what_each_span_would(spans: list[tuple[int, int]],
                                                                   watched: set[int], logging: bool) -> None:
    """Bus.dma_written_spans (a virtio device's whole scatter list) calls the same watchers with
    the same ranges and marks the same dirty pages as dma_written for each span in turn."""
    results = []
    for batched in (False, True):
        bus = Bus(RAM, 1 << 20)
        calls: list[tuple[int, int, int]] = []
        for page in watched:
            bus.watch((RAM >> 12) + page, lambda a, n, page=page, calls=calls: calls.append((page, a, n)))
        bus.watch((RAM >> 12) + 200, lambda a, n, calls=calls: calls.append((200, a, n)))    # never hit
        if logging:
            bus.start_dirty_log()
        absolute = [(RAM + a, n) for a, n in spans]
        if batched:
            bus.dma_written_spans(absolute)
        else:
            for a, n in absolute:
                bus.dma_written(a, n)
        results.append((calls, bus.harvest_dirty() if logging else None))
    assert results[0] == results[1]
    hit = {p for a, n in spans if n for p in range(a >> 12, ((a + n - 1) >> 12) + 1)} & watched
    assert {page for page, _, _ in results[1][0]} == hit
