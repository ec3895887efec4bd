"""Split virtqueues (virtio 1.2, section 2.7), hostile-guest proof.

The driver owns the descriptor table and the available ring, the device the
used ring.  Everything read from the guest is checked: descriptor indices,
chain lengths (a chain longer than the queue is a loop), indirect tables
(no nesting, sane length), and every buffer must lie inside guest RAM.  A
violation raises `QueueError`; the device then stops using the queue and
asks for a reset (DEVICE_NEEDS_RESET), as section 2.1.2 describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from struct import Struct
from typing import Any

from pyvirt.errors import GuestMemoryError
from pyvirt.memory import Bus

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

_DESC = Struct("<QIHH")


class QueueError(Exception):
    """The driver broke the virtqueue rules; the device must stop using the queue."""


@dataclass
class Chain:
    """One request: the head index and its buffers in order."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)    # (guest address, length)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


class SplitQueue:
    MAX_SIZE = 256

    def __init__(self, bus: Bus, max_size: int = MAX_SIZE) -> None:
        self.bus = bus
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc = self.avail = self.used = 0
        self.last_avail = 0
        self.used_idx = 0
        self.event_idx = False
        self.broken = False

    # -- guest memory, checked --------------------------------------------------
    def _read(self, addr: int, size: int) -> int:
        if not self.bus.is_ram(addr, size):
            raise QueueError(f"ring address {addr:#x} is outside RAM")
        return self.bus.read(addr, size)

    def _write(self, addr: int, size: int, value: int) -> None:
        if not self.bus.is_ram(addr, size):
            raise QueueError(f"ring address {addr:#x} is outside RAM")
        self.bus.write(addr, size, value)

    def _check_layout(self) -> None:
        n = self.size
        if not n or n & (n - 1) or n > self.max_size:
            raise QueueError(f"bad queue size {n}")
        for base, length in ((self.desc, 16 * n), (self.avail, 6 + 2 * n), (self.used, 6 + 8 * n)):
            if not self.bus.is_ram(base, length):
                raise QueueError(f"ring {base:#x}+{length:#x} is outside RAM")

    # -- the device's side -------------------------------------------------------------
    def has_work(self) -> bool:
        return self.ready and not self.broken and self._read(self.avail + 2, 2) != self.last_avail

    def pop(self) -> Chain | None:
        """The next available chain, or None.  Raises QueueError on a broken queue."""
        if not self.ready or self.broken:
            return None
        try:
            self._check_layout()
            avail_idx = self._read(self.avail + 2, 2)
            if avail_idx == self.last_avail:
                return None
            if (avail_idx - self.last_avail) & 0xFFFF > self.size:
                raise QueueError("available index moved further than the queue size")
            head = self._read(self.avail + 4 + 2 * (self.last_avail % self.size), 2)
            chain = self._walk(head)
        except QueueError:
            self.broken = True
            raise
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:
            self._write(self.used + 4 + 8 * self.size, 2, self.last_avail)   # avail_event
        return chain

    def _walk(self, head: int) -> Chain:
        if head >= self.size:
            raise QueueError(f"descriptor index {head} >= queue size {self.size}")
        chain = Chain(head)
        table, table_len, idx = self.desc, self.size, head
        budget = self.size            # a chain longer than the queue is a loop
        indirect = False
        while True:
            if budget <= 0:
                raise QueueError("descriptor chain loops or is longer than the queue")
            budget -= 1
            addr, length, flags, nxt = _DESC.unpack(self._desc_bytes(table, idx))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise QueueError("nested indirect descriptor table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError("indirect descriptor with NEXT set")
                if length == 0 or length % 16 or length // 16 > self.max_size:
                    raise QueueError(f"bad indirect table length {length}")
                if not self.bus.is_ram(addr, length):
                    raise QueueError("indirect table outside RAM")
                table, table_len, idx, indirect = addr, length // 16, 0, True
                budget = table_len
                continue
            if not self.bus.is_ram(addr, length):
                raise QueueError(f"buffer {addr:#x}+{length:#x} is outside RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append((addr, length))
            else:
                if chain.writable:
                    raise QueueError("device-readable buffer after a writable one")
                chain.readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise QueueError(f"next descriptor {nxt} out of range")
            idx = nxt

    def _desc_bytes(self, table: int, idx: int) -> bytes:
        addr = table + 16 * idx
        if not self.bus.is_ram(addr, 16):
            raise QueueError("descriptor outside RAM")
        return self.bus.read_bytes(addr, 16)

    def push(self, chain: Chain, written: int) -> bool:
        """Return a chain to the driver; True if the driver wants an interrupt."""
        old = self.used_idx
        slot = self.used + 4 + 8 * (old % self.size)
        self._write(slot, 4, chain.head)
        self._write(slot + 4, 4, written)
        self.used_idx = (old + 1) & 0xFFFF
        self._write(self.used + 2, 2, self.used_idx)
        return self._should_notify(old, self.used_idx)

    def _should_notify(self, old: int, new: int) -> bool:
        if self.event_idx:                                        # 2.7.10
            used_event = self._read(self.avail + 4 + 2 * self.size, 2)
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._read(self.avail, 2) & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- buffers ---------------------------------------------------------------------------
    def views(self, bufs: list[tuple[int, int]]) -> list[memoryview]:
        try:
            return [self.bus.view(a, n) for a, n in bufs]
        except GuestMemoryError as e:
            raise QueueError(str(e)) from None

    def gather(self, bufs: list[tuple[int, int]], limit: int) -> bytes:
        out = bytearray()
        for a, n in bufs:
            if len(out) >= limit:
                break
            out += self.bus.read_bytes(a, min(n, limit - len(out)))
        return bytes(out)

    def scatter(self, bufs: list[tuple[int, int]], data: bytes) -> int:
        """Copy `data` into the writable buffers in order; returns bytes written."""
        pos = 0
        for a, n in bufs:
            if pos >= len(data):
                break
            piece = data[pos:pos + n]
            self.bus.write_bytes(a, piece)
            pos += len(piece)
        return pos

    def save(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("size", "ready", "desc", "avail", "used", "last_avail",
                                              "used_idx", "event_idx", "broken")}

    def load(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
