"""Split virtqueues (virtio 1.2, section 2.7), proof against a hostile driver.

Three areas in guest RAM, placed by the driver (2.7, "Split Virtqueues")::

    descriptor table  16 * size bytes, align 16   {le64 addr; le32 len; le16 flags; le16 next}
    available ring    6 + 2 * size, align 2        {le16 flags; le16 idx; le16 ring[size];
                                                    le16 used_event}
    used ring         6 + 8 * size, align 4        {le16 flags; le16 idx;
                                                    {le32 id; le32 len} ring[size];
                                                    le16 avail_event}

The driver owns the descriptor table and the available ring; the device owns
the used ring.  Everything read from the guest is checked before use: the
ring layout when the queue is enabled (size a power of two no larger than the
device's maximum, areas aligned and inside RAM), each head index, each
descriptor's buffer (inside RAM), chain length (a chain may not be longer
than the queue -- 2.7.5.3.1 -- so a loop is caught after at most `size`
steps), indirect tables (2.7.5.3: no NEXT with INDIRECT, no table inside a
table, a length that is a non-zero multiple of 16 and inside RAM), buffer
order (device-writable after device-readable, 2.7.4.2), and the available
index (it cannot run ahead of the device by more than the queue size).

A violation raises `QueueError` and marks the queue broken: the device stops
using it and reports DEVICE_NEEDS_RESET (2.1.2).  Nothing here raises any
other exception for guest input, and nothing touches memory outside RAM.

Notification suppression (2.7.7, 2.7.10): without VIRTIO_F_EVENT_IDX the
device interrupts unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT; with it,
only when the used index passes the driver's `used_event`, and the device
publishes `avail_event` so the driver kicks only when needed -- never for a
`polled` queue, which the device serves between CPU slices on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from struct import Struct
from typing import Any

from pyvirt.compat import DATACLASS_SLOTS
from pyvirt.memory import Bus
from pyvirt.state import U16, U64, Schema, boolean, integer, record, text

VIRTQ_DESC_F_NEXT = 1        # the buffer continues in the `next` descriptor
VIRTQ_DESC_F_WRITE = 2       # device-writable (otherwise device-readable)
VIRTQ_DESC_F_INDIRECT = 4    # the buffer is a table of descriptors
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768       # 2.7: "The maximum Queue Size value is 32768"

_DESC = Struct("<QIHH")
_U16 = Struct("<H")
_USED_ELEM = Struct("<II")

Span = tuple[int, int]       # (guest-physical address, length)


class QueueError(Exception):
    """The driver broke the virtqueue rules; the device must stop using the queue."""


def vring_need_event(event: int, new: int, old: int) -> bool:
    """2.7.10: has the index moved from `old` to `new` past `event`?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


@dataclass(**DATACLASS_SLOTS)
class Chain:
    """One request popped from the available ring: its head and its buffers."""

    head: int
    readable: list[Span] = field(default_factory=list)
    writable: list[Span] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0


def split_spans(spans: Sequence[Span], n: int) -> tuple[list[Span], list[Span]]:
    """The first `n` bytes of `spans` and the rest, as two span lists."""
    head: list[Span] = []
    tail: list[Span] = []
    for addr, length in spans:
        if n >= length:
            head.append((addr, length))
            n -= length
        elif n > 0:
            head.append((addr, n))
            tail.append((addr + n, length - n))
            n = 0
        else:
            tail.append((addr, length))
    return head, tail


def spans_len(spans: Sequence[Span]) -> int:
    return sum(n for _, n in spans)


class SplitQueue:
    """The device's side of one split virtqueue."""

    MAX_SIZE = 256

    def __init__(self, max_size: int = MAX_SIZE, bus: Bus | None = None) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} must be a power of two up to {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.bus: Bus = bus  # type: ignore[assignment]   # set by the device's attach()
        # The device looks at this queue between every two CPU slices anyway (virtio-net's
        # poll): the driver need not kick it, and each kick would be an exit from guest code.
        self.polled = False
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size      # QueueNum; the driver may lower it
        self.ready = False
        self.desc = self.avail = self.used = 0
        self.last_avail = 0            # next available-ring entry to take
        self.used_idx = 0              # next used-ring entry to fill
        self.signalled_used = 0        # used_idx at the last notification decision
        self.event_idx = False         # VIRTIO_F_EVENT_IDX negotiated
        self.broken = ""               # why the device stopped using the queue ("" if fine)

    # -- set-up -------------------------------------------------------------------------
    def enable(self, event_idx: bool) -> None:
        """QueueReady was set: check the layout once (4.2.3.2); a bad one breaks the queue."""
        self.ready = True
        self.event_idx = event_idx
        self.last_avail = self.used_idx = self.signalled_used = 0
        self.broken = ""
        try:
            self._check_layout()
        except QueueError as e:
            self.broken = str(e)

    def disable(self) -> None:
        self.ready = False

    def _check_layout(self) -> None:
        n = self.size
        if not 1 <= n <= self.max_size or n & (n - 1):
            raise QueueError(f"queue size {n} is not a power of two in 1..{self.max_size}")
        for name, base, length, align in (("descriptor table", self.desc, 16 * n, 16),
                                          ("available ring", self.avail, 6 + 2 * n, 2),
                                          ("used ring", self.used, 6 + 8 * n, 4)):
            if base % align:
                raise QueueError(f"{name} at {base:#x} is not {align}-byte aligned")
            if not self.bus.is_ram(base, length):
                raise QueueError(f"{name} {base:#x}+{length:#x} is outside RAM")

    # -- checked guest memory (only ring fields; the layout is already known to be in RAM)
    # (straight into RAM: every ring field lies in the rings _check_layout found in RAM)
    def _read16(self, addr: int) -> int:
        bus = self.bus
        return _U16.unpack_from(bus.ram, addr - bus.ram_base)[0]

    def _write16(self, addr: int, value: int) -> None:
        bus = self.bus
        _U16.pack_into(bus.ram, addr - bus.ram_base, value)
        bus.dma_written(addr, 2)

    def _fail(self, why: str) -> QueueError:
        self.broken = why
        return QueueError(why)

    # -- taking requests ----------------------------------------------------------------------
    def avail_idx(self) -> int:
        return self._read16(self.avail + 2)

    def has_work(self) -> bool:
        return self.ready and not self.broken and self.avail_idx() != self.last_avail

    def pop(self) -> Chain | None:
        """The next available chain, or None.  Raises QueueError if the driver broke the rules."""
        if not self.ready:
            return None
        if self.broken:
            raise QueueError(self.broken)
        avail_idx = self.avail_idx()
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise self._fail(f"available index {avail_idx} is {pending} entries ahead "
                             f"of the device, more than the queue size {self.size}")
        head = self._read16(self.avail + 4 + 2 * (self.last_avail & (self.size - 1)))
        try:
            chain = self._walk(head)
        except QueueError as e:
            self.broken = str(e)
            raise
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def unpop(self) -> None:
        """Give back the chain `pop` returned last, unfinished: the next `pop` returns it
        again (a device that cannot take it yet, e.g. its host side is congested)."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def chain_at(self, head: int) -> Chain:
        """The chain from descriptor `head`, checked as `pop` checks it (QueueError if bad),
        without taking it or breaking the queue (a vhost-user device walking used entries)."""
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise QueueError(f"head descriptor {head} is beyond the queue size {size}")
        bus = self.bus
        ram, ram_base, ram_end = bus.ram, bus.ram_base, bus.ram_end
        unpack = _DESC.unpack_from
        chain = Chain(head)
        readable, writable = chain.readable, chain.writable
        readable_len = writable_len = 0
        # Descriptors are read straight from RAM: the ring's table was checked to lie in RAM
        # when the queue was enabled (_check_layout), an indirect table is checked below.
        table, table_len, idx = self.desc - ram_base, size, head
        indirect = False
        count = 0
        while True:
            count += 1
            if count > size:
                raise QueueError(f"descriptor chain from head {head} is longer than the "
                                 f"queue size {size} (a loop?)")
            addr, length, flags, nxt = unpack(ram, table + 16 * idx)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise QueueError("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError("indirect descriptor with NEXT set")
                if length == 0 or length % 16:
                    raise QueueError(f"indirect table length {length} is not a multiple of 16")
                if not (ram_base <= addr and addr + length <= ram_end):
                    raise QueueError(f"indirect table {addr:#x}+{length:#x} is outside RAM")
                table, table_len, idx, indirect = addr - ram_base, length // 16, 0, True
                count -= 1                 # the table pointer is not a buffer
                continue
            if not (ram_base <= addr and addr + length <= ram_end):
                raise QueueError(f"buffer {addr:#x}+{length:#x} is outside RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
                writable_len += length
            else:
                if writable:
                    raise QueueError("device-readable buffer after a device-writable one")
                readable.append((addr, length))
                readable_len += length
            if not flags & VIRTQ_DESC_F_NEXT:
                chain.readable_len, chain.writable_len = readable_len, writable_len
                return chain
            if nxt >= table_len:
                raise QueueError(f"next descriptor {nxt} is beyond its table of {table_len}")
            idx = nxt

    # -- returning requests --------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Put a finished chain on the used ring; `written` = bytes the device wrote.

        A chain finished after the queue was reset or broke is dropped: its ring is gone.
        """
        if not self.ready or self.broken:
            return
        slot = self.used + 4 + 8 * (self.used_idx & (self.size - 1))
        bus = self.bus
        _USED_ELEM.pack_into(bus.ram, slot - bus.ram_base, head, written & 0xFFFF_FFFF)
        bus.dma_written(slot, 8)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._write16(self.used + 2, self.used_idx)

    def push_many(self, entries: Sequence[tuple[int, int]]) -> None:
        """`push` for several finished chains, (head, written) in order: the used elements,
        then the used index once, so the driver sees them together (2.7.8)."""
        if not self.ready or self.broken or not entries:
            return
        bus = self.bus
        ram, ring, mask, idx = bus.ram, self.used + 4 - bus.ram_base, self.size - 1, self.used_idx
        pack = _USED_ELEM.pack_into
        for head, written in entries:
            pack(ram, ring + 8 * (idx & mask), head, written & 0xFFFF_FFFF)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        _U16.pack_into(ram, self.used + 2 - bus.ram_base, idx)
        bus.dma_written(self.used, 4 + 8 * self.size)

    def publish_avail_event(self) -> None:
        """With EVENT_IDX: ask to be kicked when the driver makes entry `last_avail` available.

        A `polled` queue asks for no kicks: `avail_event` half the index space behind
        `last_avail`, or without EVENT_IDX the used ring's VIRTQ_USED_F_NO_NOTIFY flag
        (2.7.7).  The driver kicks when a batch it made available, from the index of its last
        decision on, passes `avail_event` (2.7.10).  Such a batch starts at most a queue's
        size behind `last_avail`, so it never reaches an entry that far back; the device
        writes this again long before the index gets round.  (One entry behind was not
        enough: a poll between two slices can take entries the driver has made available
        but not yet decided about, and then its batch started before `last_avail - 1`.)"""
        if not self.ready or self.broken:
            return
        if self.event_idx:
            event = (self.last_avail - 0x8000) & 0xFFFF if self.polled else self.last_avail
            self._write16(self.used + 4 + 8 * self.size, event)
        else:
            self._write16(self.used, VIRTQ_USED_F_NO_NOTIFY if self.polled else 0)

    def should_notify(self) -> bool:
        """Does the driver want an interrupt for what was used since the last decision?"""
        if not self.ready or self.broken:
            return False
        old, new = self.signalled_used, self.used_idx
        self.signalled_used = new
        if old == new:
            return False
        if self.event_idx:
            used_event = self._read16(self.avail + 4 + 2 * self.size)
            return vring_need_event(used_event, new, old)
        return not self._read16(self.avail) & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- buffers --------------------------------------------------------------------------------
    def views(self, spans: Sequence[Span]) -> list[memoryview]:
        """Zero-copy views of guest RAM; release them after use (`release_views`)."""
        bus = self.bus
        base, end = bus.ram_base, bus.ram_end
        for a, n in spans:
            if not (base <= a and a + n <= end and n >= 0):    # cannot happen for checked spans
                raise QueueError(f"guest range {a:#x}+{n:#x} is outside RAM")
        with memoryview(bus.ram) as ram:
            return [ram[a - base:a - base + n] for a, n in spans]

    @staticmethod
    def release_views(views: Sequence[memoryview]) -> None:
        for v in views:
            v.release()

    def dma_written(self, spans: Sequence[Span], count: int | None = None) -> None:
        """Tell the bus that the device wrote the first `count` bytes of `spans`."""
        if count is not None:
            spans, _ = split_spans(spans, count)
        self.bus.dma_written_spans(spans)

    def gather(self, spans: Sequence[Span], limit: int) -> bytes:
        """Up to `limit` bytes read from `spans` in order."""
        out = bytearray()
        for addr, length in spans:
            if len(out) >= limit:
                break
            out += self.bus.read_bytes(addr, min(length, limit - len(out)))
        return bytes(out)

    def scatter(self, spans: Sequence[Span], data: bytes | bytearray | memoryview) -> int:
        """Copy `data` into `spans` in order; returns the bytes written."""
        pos = 0
        mv = memoryview(data)
        for addr, length in spans:
            if pos >= len(mv):
                break
            piece = mv[pos:pos + length]
            self.bus.write_bytes(addr, piece)
            pos += len(piece)
        return pos

    # -- state ----------------------------------------------------------------------------------
    _FIELDS = ("size", "ready", "desc", "avail", "used", "last_avail", "used_idx", "signalled_used",
               "event_idx", "broken")

    def state_schema(self) -> Schema:
        """What `load()` accepts (checked before it runs; pyvirt/state.py)."""
        return record({"size": integer(0, self.max_size), "ready": boolean, "desc": U64,
                       "avail": U64, "used": U64, "last_avail": U16, "used_idx": U16,
                       "signalled_used": U16, "event_idx": boolean, "broken": text()})

    def save(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._FIELDS}

    def load(self, state: dict[str, Any]) -> None:
        for k in self._FIELDS:
            setattr(self, k, state[k])
        if self.ready and not self.broken:
            try:                                 # a snapshot is input too
                self._check_layout()
            except QueueError as e:
                self.broken = str(e)
