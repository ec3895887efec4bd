"""A mock virtio driver for device tests.

`MockVirtioDriver(bus, mmio_base)` drives a virtio-mmio device mapped on a
`Bus` through its registers the way Linux's virtio_mmio and virtio_ring do
(reset, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK read back,
queue set-up, DRIVER_OK), builds split virtqueues in guest RAM, posts
descriptor chains (direct or through an indirect table), kicks, and reads
the used ring.  Every structure it writes can also be written by hand
(`write_desc`, `publish`, `set_avail_idx`, ...), so a test can play a
hostile guest.

Guest memory for rings and buffers comes from a bump allocator over a region
of RAM (by default the upper half).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyvirt.compat import zip_strict
from pyvirt.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
)
from pyvirt.devices.virtio.mmio import (
    CONFIG,
    CONFIG_GENERATION,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MAGIC,
    MAGIC_VALUE,
    QUEUE_DESC_HIGH,
    QUEUE_DESC_LOW,
    QUEUE_DEVICE_HIGH,
    QUEUE_DEVICE_LOW,
    QUEUE_DRIVER_HIGH,
    QUEUE_DRIVER_LOW,
    QUEUE_NOTIFY,
    QUEUE_NUM,
    QUEUE_NUM_MAX,
    QUEUE_READY,
    QUEUE_SEL,
    STATUS,
    VERSION,
    VERSION_REG,
)
from pyvirt.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvirt.memory import Bus

F_NEXT, F_WRITE, F_INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
_DESC = struct.Struct("<QIHH")


class DriverError(AssertionError):
    """The device did not behave as the driver expects (a test failure)."""


@dataclass
class Buffer:
    """One descriptor's buffer: guest address, length, device-writable or not."""

    addr: int
    length: int
    writable: bool = False


class GuestAllocator:
    """A bump allocator over [base, base + size) of guest RAM."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.end, self.next = base, base + size, base

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(f"mock driver out of guest memory ({size} bytes wanted)")
        self.next = addr + size
        return addr


class MockQueue:
    """The driver's side of one split virtqueue in guest RAM."""

    def __init__(self, bus: Bus, mem: GuestAllocator, index: int, size: int, event_idx: bool) -> None:
        self.bus, self.mem, self.index, self.size = bus, mem, index, size
        self.event_idx = event_idx
        self.desc = mem.alloc(16 * size, 16)
        self.avail = mem.alloc(6 + 2 * size, 2)
        self.used = mem.alloc(6 + 8 * size, 4096)
        bus.write_bytes(self.desc, bytes(16 * size))
        bus.write_bytes(self.avail, bytes(6 + 2 * size))
        bus.write_bytes(self.used, bytes(6 + 8 * size))
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}
        self.avail_idx = 0
        self.last_used = 0

    # -- posting ----------------------------------------------------------------------------
    def add(self, bufs: Sequence[Buffer], indirect: bool = False) -> int:
        """Post a chain (readable buffers first, then writable); returns its head."""
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table = self.mem.alloc(16 * len(bufs), 16)
            for i, b in enumerate(bufs):
                flags = (F_WRITE if b.writable else 0) | (F_NEXT if i + 1 < len(bufs) else 0)
                self.bus.write_bytes(table + 16 * i, _DESC.pack(b.addr, b.length, flags, i + 1))
            head = self._take(1)[0]
            self.write_desc(head, table, 16 * len(bufs), F_INDIRECT, 0)
            self.chains[head] = [head]
        else:
            idxs = self._take(len(bufs))
            for i, (b, idx) in enumerate(zip_strict(bufs, idxs)):
                last = i + 1 == len(bufs)
                flags = (F_WRITE if b.writable else 0) | (0 if last else F_NEXT)
                self.write_desc(idx, b.addr, b.length, flags, 0 if last else idxs[i + 1])
            head = idxs[0]
            self.chains[head] = idxs
        self.publish(head)
        return head

    def _take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise DriverError(f"queue {self.index} has {len(self.free)} free descriptors, {n} wanted")
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def write_desc(self, idx: int, addr: int, length: int, flags: int, nxt: int) -> None:
        """Write descriptor `idx` of the table directly (any values at all)."""
        self.bus.write_bytes(self.desc + 16 * idx, _DESC.pack(addr & (2**64 - 1), length & 0xFFFF_FFFF,
                                                              flags & 0xFFFF, nxt & 0xFFFF))

    def publish(self, head: int) -> None:
        """Put `head` in the next available-ring slot and bump the available index."""
        self.bus.write(self.avail + 4 + 2 * (self.avail_idx % self.size), 2, head & 0xFFFF)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.bus.write(self.avail + 2, 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.bus.write(self.avail + 2, 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.bus.write(self.avail, 2, flags & 0xFFFF)

    def set_used_event(self, value: int) -> None:
        self.bus.write(self.avail + 4 + 2 * self.size, 2, value & 0xFFFF)

    def avail_event(self) -> int:
        """The device's request: kick me when the available index passes this."""
        return self.bus.read(self.used + 4 + 8 * self.size, 2)

    # -- completions -------------------------------------------------------------------------
    def used_idx(self) -> int:
        return self.bus.read(self.used + 2, 2)

    def used_entries(self) -> list[tuple[int, int]]:
        """New (head, written length) pairs from the used ring; their descriptors are
        freed, and with EVENT_IDX `used_event` moves on (as Linux re-arms callbacks)."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = self.bus.read(slot, 4), self.bus.read(slot + 4, 4)
            out.append((head, length))
            self.free += self.chains.pop(head, [])
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.set_used_event(self.last_used)
        return out


class MockVirtioDriver:
    """A virtio-mmio driver in miniature, talking to the device through the bus."""

    def __init__(self, bus: Bus, mmio_base: int, mem_base: int | None = None,
                 mem_size: int | None = None) -> None:
        self.bus = bus
        self.base = mmio_base
        if mem_base is None:
            mem_base = bus.ram_base + bus.ram_size // 2
        if mem_size is None:
            mem_size = bus.ram_end - mem_base
        self.mem = GuestAllocator(mem_base, mem_size)
        self.queues: dict[int, MockQueue] = {}
        self.features = 0

    # -- registers ---------------------------------------------------------------------------
    def reg(self, offset: int) -> int:
        return self.bus.read(self.base + offset, 4)

    def set(self, offset: int, value: int) -> None:
        self.bus.write(self.base + offset, 4, value)

    @property
    def status(self) -> int:
        return self.reg(STATUS)

    def config_read(self, offset: int, size: int) -> int:
        return self.bus.read(self.base + CONFIG + offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.bus.write(self.base + CONFIG + offset, size, value)

    def config_generation(self) -> int:
        return self.reg(CONFIG_GENERATION)

    def device_features(self) -> int:
        self.set(DEVICE_FEATURES_SEL, 0)
        lo = self.reg(DEVICE_FEATURES)
        self.set(DEVICE_FEATURES_SEL, 1)
        return lo | (self.reg(DEVICE_FEATURES) << 32)

    # -- initialisation (3.1.1) ------------------------------------------------------------------
    def reset(self) -> None:
        self.set(STATUS, 0)
        if self.status != 0:
            raise DriverError("device status is not 0 after reset")
        self.queues.clear()

    def negotiate(self, accept: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write features (default: everything offered;
        `accept` is written as given, even bits never offered), FEATURES_OK.
        True if the device kept FEATURES_OK."""
        self.reset()
        if self.reg(MAGIC_VALUE) != MAGIC or self.reg(VERSION_REG) != VERSION:
            raise DriverError("not a virtio-mmio version 2 device")
        self.set(STATUS, STATUS_ACKNOWLEDGE)
        self.set(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        feats = self.device_features() if accept is None else accept
        for sel in (0, 1):
            self.set(DRIVER_FEATURES_SEL, sel)
            self.set(DRIVER_FEATURES, (feats >> (32 * sel)) & 0xFFFF_FFFF)
        self.set(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        self.features = feats
        return bool(self.status & STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> MockQueue:
        self.set(QUEUE_SEL, index)
        if self.reg(QUEUE_READY):
            raise DriverError(f"queue {index} is already ready")
        num_max = self.reg(QUEUE_NUM_MAX)
        if num_max == 0:
            raise DriverError(f"queue {index} does not exist")
        size = size or num_max
        q = MockQueue(self.bus, self.mem, index, size, bool(self.features & VIRTIO_F_EVENT_IDX))
        self.set(QUEUE_NUM, size)
        for lo, hi, addr in ((QUEUE_DESC_LOW, QUEUE_DESC_HIGH, q.desc),
                             (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, q.avail),
                             (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, q.used)):
            self.set(lo, addr & 0xFFFF_FFFF)
            self.set(hi, addr >> 32)
        self.set(QUEUE_READY, 1)
        self.queues[index] = q
        return q

    def driver_ok(self) -> None:
        self.set(STATUS, self.status | STATUS_DRIVER_OK)

    def init(self, accept: int | None = None, queues: int = 1,
             queue_size: int | None = None) -> list[MockQueue]:
        """The whole sequence: negotiate, set up `queues` queues, DRIVER_OK."""
        if not self.negotiate(accept):
            raise DriverError("device refused FEATURES_OK")
        if not self.features & VIRTIO_F_VERSION_1:
            raise DriverError("device does not offer VIRTIO_F_VERSION_1")
        qs = [self.setup_queue(i, queue_size) for i in range(queues)]
        self.driver_ok()
        return qs

    # -- running ------------------------------------------------------------------------------
    def kick(self, index: int = 0) -> None:
        self.set(QUEUE_NOTIFY, index)

    def interrupt_status(self) -> int:
        return self.reg(INTERRUPT_STATUS)

    def ack_interrupt(self) -> int:
        status = self.interrupt_status()
        self.set(INTERRUPT_ACK, status)
        return status

    # -- guest memory ---------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        return self.mem.alloc(size, align)

    def buffer(self, data: bytes | int, writable: bool = False) -> Buffer:
        """A buffer in guest RAM: holding `data`, or `data` zeroed bytes if an int."""
        length = data if isinstance(data, int) else len(data)
        addr = self.alloc(max(length, 1))
        self.bus.write_bytes(addr, bytes(length) if isinstance(data, int) else data)
        return Buffer(addr, length, writable)

    def read(self, buf: Buffer, length: int | None = None) -> bytes:
        return self.bus.read_bytes(buf.addr, buf.length if length is None else length)
