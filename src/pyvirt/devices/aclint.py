"""CLINT: the SiFive core-local interruptor ("sifive,clint0", "riscv,clint0"), which
the RISC-V ACLINT specification splits into an MSWI and an MTIMER device; this
is the combined SiFive layout QEMU's virt board has::

    0x0000 + 4*h    msip[h]       bit 0 = hart h's machine software interrupt (MSIP)
    0x4000 + 8*h    mtimecmp[h]   64 bits; MTIP[h] = (mtime >= mtimecmp[h])
    0xbff8          mtime         64 bits, follows the VM clock; writes are ignored

msip is a 32-bit register; mtimecmp and mtime take 32-bit accesses to either
half and 64-bit accesses to the whole ("ACLINT: MTIMER Device": naturally
aligned 32-bit and 64-bit accesses).  mtimecmp resets to all ones (never).

The timer lines change with time, not with register accesses: the run loop
calls `poll()` between CPU slices and sleeps at most until `next_deadline()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from pyvirt.compat import zip_strict
from pyvirt.devices.base import IrqLine
from pyvirt.state import U64, Schema, integer, listof, record

M64 = (1 << 64) - 1
MSIP_BASE = 0x0000
MTIMECMP_BASE = 0x4000
MTIME = 0xBFF8
MAX_HARTS = 4095            # 0x4000 / 4, minus one: the msip array's room


class TickSource(Protocol):
    """The part of `pyvirt.clock.Clock` the CLINT needs."""

    def ticks(self) -> int: ...


class Aclint:
    SIZE = 0x10000

    def __init__(self, num_harts: int, clock: TickSource, msip: Sequence[IrqLine],
                 mtip: Sequence[IrqLine]) -> None:
        if not 1 <= num_harts <= MAX_HARTS:
            raise ValueError(f"CLINT supports 1..{MAX_HARTS} harts, not {num_harts}")
        if len(msip) != num_harts or len(mtip) != num_harts:
            raise ValueError("the CLINT needs one msip and one mtip line per hart")
        self.n = num_harts
        self.clock = clock
        self.msip_lines = list(msip)
        self.mtip_lines = list(mtip)
        self.reset()

    def reset(self) -> None:
        self.msip = [0] * self.n
        self.mtimecmp = [M64] * self.n
        for line in self.msip_lines:
            line.set(False)
        self._compared()

    def _compared(self) -> None:
        """mtimecmp changed: every line again, and the earliest compare value kept."""
        self._soonest = min(self.mtimecmp)
        self._up = True                 # (as if a line were up: poll sets each one)
        self.poll()

    # -- time -----------------------------------------------------------------------------
    def poll(self) -> None:
        """Bring the MTIP lines up to date with the clock.  Between two slices this is
        one comparison while every line is down and no compare value has come (a guest
        with Sstc never arms mtimecmp)."""
        now = self.clock.ticks()
        if not self._up and now < self._soonest:
            return
        up = False
        for line, cmp in zip_strict(self.mtip_lines, self.mtimecmp):
            level = now >= cmp
            line.set(level)
            up = up or level
        self._up = up

    def next_deadline(self) -> int | None:
        """The earliest mtimecmp still in the future, in clock ticks (None: none armed)."""
        now = self.clock.ticks()
        future = [c for c in self.mtimecmp if now < c != M64]
        return min(future) if future else None

    # -- registers --------------------------------------------------------------------------
    @staticmethod
    def _field(offset: int, size: int) -> tuple[int, int] | None:
        """(shift, mask) of a naturally aligned 4- or 8-byte access inside a 64-bit register."""
        if size not in (4, 8) or offset % size:
            return None
        return 8 * (offset & 7), (1 << (8 * size)) - 1

    def read(self, offset: int, size: int) -> int:
        if offset < 4 * self.n:
            if size == 4 and offset % 4 == 0:
                return self.msip[offset >> 2]
            return 0
        field = self._field(offset, size)
        if field is None:
            return 0
        shift, mask = field
        if MTIMECMP_BASE <= offset < MTIMECMP_BASE + 8 * self.n:
            return (self.mtimecmp[(offset - MTIMECMP_BASE) >> 3] >> shift) & mask
        if MTIME <= offset < MTIME + 8:
            return ((self.clock.ticks() & M64) >> shift) & mask
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4 * self.n:
            if size == 4 and offset % 4 == 0:
                h = offset >> 2
                self.msip[h] = value & 1
                self.msip_lines[h].set(bool(value & 1))
            return
        field = self._field(offset, size)
        if field is None:
            return
        shift, mask = field
        if MTIMECMP_BASE <= offset < MTIMECMP_BASE + 8 * self.n:
            h = (offset - MTIMECMP_BASE) >> 3
            old = self.mtimecmp[h]
            self.mtimecmp[h] = (old & ~(mask << shift) & M64) | ((value & mask) << shift)
            self._compared()
        # mtime is read-only: it follows the VM clock.

    # -- state ------------------------------------------------------------------------------
    def state_schema(self) -> Schema:
        """What `load()` accepts (checked before it runs; pyvirt/state.py)."""
        return record({"msip": listof(integer(0, 1), self.n), "mtimecmp": listof(U64, self.n)})

    def save(self) -> dict[str, Any]:
        return {"msip": list(self.msip), "mtimecmp": list(self.mtimecmp)}

    def load(self, state: dict[str, Any]) -> None:
        if len(state["msip"]) != self.n or len(state["mtimecmp"]) != self.n:
            raise ValueError("CLINT state is for a different number of harts")
        self.msip = list(state["msip"])
        self.mtimecmp = list(state["mtimecmp"])
        for line, v in zip_strict(self.msip_lines, self.msip):
            line.set(bool(v))
        self._compared()
