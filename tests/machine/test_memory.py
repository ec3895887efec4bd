"""Guest RAM as the host holds it: private, zeroed, in huge pages where the host allows."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import pytest

from pyvirt.memory import HUGE_PAGE, RAM_TAIL, Bus, anonymous_ram

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vma_flags(addr: int) -> tuple[int, list[str]]:
    """(start, VmFlags) of this process's mapping that holds `addr` (/proc/self/smaps)."""
    start = -1
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            start = lo if lo <= addr < hi else -1
        elif head == "VmFlags:" and start >= 0:
            return start, line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


@pytest.mark.parametrize("size", [32 << 20, (32 << 20) + RAM_TAIL, 5 << 12])
def test_fresh_ram_is_private_zeroed_and_asks_for_huge_pages(size: int) -> None:
    m = anonymous_ram(size)
    assert len(m) >= size and len(m) % HUGE_PAGE == 0
    start, flags = _vma_flags(_address(m))
    assert start == _address(m) and start % HUGE_PAGE == 0     # guest 2 MiB pages = host ones
    assert "sh" not in flags                                    # not shared memory (no huge pages there)
    if THP.exists() and "[never]" not in THP.read_text():
        assert "hg" in flags                                    # MADV_HUGEPAGE
    assert m[:4096] == bytes(4096) and m[len(m) - 4096:] == bytes(4096)


def test_the_bus_makes_its_ram_so() -> None:
    bus = Bus(0x8000_0000, 64 << 20)
    assert len(bus.ram) >= (64 << 20) + RAM_TAIL and bus.ram_private
    start, flags = _vma_flags(_address(bus.ram))
    assert start % HUGE_PAGE == 0 and "sh" not in flags
    bus.write(0x8000_0000 + (3 << 20) + 5, 4, 0x12345678)
    assert bus.touched_pages(0, 64 << 8) and bus.read(0x8000_0000 + (3 << 20) + 5, 4) == 0x12345678
