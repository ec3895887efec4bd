"""CLINT (the SiFive core-local interruptor; the ACLINT spec's MSWI + MTIMER).

msip at 4*hart, mtimecmp at 0x4000 + 8*hart, mtime at 0xbff8.  mtime follows
the VM clock and is read-only here.  Timer interrupt lines are brought up to
date by `poll()`, which the run loop calls between CPU slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyvirt.clock import Clock
from pyvirt.devices.base import IrqLine

M64 = (1 << 64) - 1
MTIMECMP, MTIME = 0x4000, 0xBFF8


class Aclint:
    SIZE = 0x10000

    def __init__(self, num_harts: int, clock: Clock, msip: Sequence[IrqLine], mtip: Sequence[IrqLine]) -> None:
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
        self.poll()

    def poll(self) -> None:
        now = self.clock.ticks()
        for h in range(self.n):
            self.mtip_lines[h].set(now >= self.mtimecmp[h])

    def next_deadline(self) -> int | None:
        pending = [c for c in self.mtimecmp if c != M64]
        return min(pending) if pending else None

    def _get64(self, value: int, offset: int, size: int) -> int:
        shift = 8 * (offset & 7)
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def read(self, offset: int, size: int) -> int:
        if offset < 4 * self.n and size == 4 and offset % 4 == 0:
            return self.msip[offset // 4]
        if MTIMECMP <= offset < MTIMECMP + 8 * self.n:
            h = (offset - MTIMECMP) // 8
            return self._get64(self.mtimecmp[h], offset, size)
        if MTIME <= offset < MTIME + 8:
            return self._get64(self.clock.ticks(), offset, size)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4 * self.n and size == 4 and offset % 4 == 0:
            h = offset // 4
            self.msip[h] = value & 1
            self.msip_lines[h].set(bool(value & 1))
            return
        if MTIMECMP <= offset < MTIMECMP + 8 * self.n:
            h = (offset - MTIMECMP) // 8
            shift = 8 * (offset & 7)
            mask = ((1 << (8 * size)) - 1) << shift
            self.mtimecmp[h] = (self.mtimecmp[h] & ~mask & M64) | ((value << shift) & mask)
            self.poll()

    def save(self) -> dict[str, Any]:
        return {"msip": list(self.msip), "mtimecmp": list(self.mtimecmp)}

    def load(self, state: dict[str, Any]) -> None:
        self.msip = list(state["msip"])
        self.mtimecmp = list(state["mtimecmp"])
        for line, v in zip(self.msip_lines, self.msip, strict=True):
            line.set(bool(v))
        self.poll()
