"""A block backend's dirty-block bitmap: which blocks were written since the last harvest.

A migration that copies a disk (vmm/migration.py, `copy_storage`) reads the whole disk
while the guest runs, then, round after round, the blocks the guest wrote meanwhile; the
last round goes during the pause.  It puts a `TrackedBackend` in front of the backend the
virtio-blk device uses: every call that changes what the disk reads as -- `write`, `writev`,
`discard`, `write_zeroes` -- marks the blocks it touched, *after* the change is made (the
run loop's thread does both, so a harvest never falls between the change and its mark; the
order matters only for a reader that harvests between two calls, who then sees the change
in the next round).  Everything else is the inner backend's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyvirt.backends.block import Buffer

BLOCK = 64 << 10       # the bitmap's granularity (QEMU's mirror job's default too)


class DirtyBlocks:
    """One byte per BLOCK of a disk of `size` bytes."""

    def __init__(self, size: int, block: int = BLOCK) -> None:
        self.size, self.block = size, block
        self.count = -(-size // block)
        self.bits = bytearray(self.count)

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = max(0, offset // self.block)
        last = min(self.count - 1, (offset + length - 1) // self.block)
        if first <= last:
            self.bits[first:last + 1] = b"\x01" * (last + 1 - first)

    def harvest(self) -> list[int]:
        """The blocks written since the last harvest, in order; the bitmap is cleared."""
        bits = self.bits
        out = []
        i = bits.find(1)
        while i >= 0:
            out.append(i)
            i = bits.find(1, i + 1)
        if out:
            self.bits = bytearray(self.count)
        return out


class TrackedBackend:
    """`inner` with every change marked in `log` (see the module's notes)."""

    def __init__(self, inner: Any, log: DirtyBlocks | None = None) -> None:
        self.inner = inner
        self.log = log if log is not None else DirtyBlocks(inner.size)

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name)
        if name != "write_zeroes":
            return found

        def write_zeroes(offset: int, length: int) -> None:   # (only where the inner one has it)
            try:
                found(offset, length)
            finally:
                self.log.mark(offset, length)
        return write_zeroes

    def write(self, offset: int, data: Buffer) -> int:
        try:
            return int(self.inner.write(offset, data))
        finally:                       # (a write that failed half-way may have changed some)
            self.log.mark(offset, memoryview(data).nbytes)

    def writev(self, offset: int, bufs: Sequence[Buffer]) -> int:
        try:
            return int(self.inner.writev(offset, bufs))
        finally:
            self.log.mark(offset, sum(memoryview(b).nbytes for b in bufs))

    def discard(self, offset: int, length: int) -> None:
        try:
            self.inner.discard(offset, length)
        finally:
            self.log.mark(offset, length)
