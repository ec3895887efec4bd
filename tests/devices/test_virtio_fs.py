"""virtio-fs over a vhost-user back end: the front end's messages, guest RAM shared through
the memfd, the coherence walk (pages the back end wrote invalidate translated code and are
marked dirty before the interrupt), and a hostile back end (each reply length-checked)."""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
import threading
from typing import Any

import pytest

from pyvirt.backends import vhost_user as vu
from pyvirt.backends.vhost_user import VhostUserError, VhostUserFrontEnd
from pyvirt.devices.base import IrqLine
from pyvirt.devices.virtio.device import STATUS_DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1
from pyvirt.devices.virtio.fs import VIRTIO_ID_FS, VirtioFs
from pyvirt.devices.virtio.mmio import VirtioMmio
from pyvirt.errors import ConfigError
from pyvirt.memory import Bus, shared_ram
from pyvirt.testing.virtq import Buffer, MockVirtioDriver

RAM, RAM_SIZE, MMIO = 0x8000_0000, 4 << 20, 0x1000_1000
FEATURES = VIRTIO_F_VERSION_1 | vu.F_PROTOCOL_FEATURES | (1 << 29)   # (29: EVENT_IDX, not passed on)


class FakeBackEnd(threading.Thread):
    """A vhost-user back end in miniature: answers the front end as virtiofsd would and keeps
    every message and descriptor it was given."""

    def __init__(self, sock: socket.socket, protocol: int = vu.PROTOCOL_F_REPLY_ACK) -> None:
        super().__init__(daemon=True)
        self.sock, self.protocol = sock, protocol
        self.messages: list[tuple[int, bytes, list[int]]] = []
        self.fds: dict[tuple[int, int], int] = {}     # (request, ring) -> descriptor
        self.mem_fd = -1

    def run(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(12, socket.CMSG_SPACE(4 * 8))
            except OSError:
                return
            if not data:
                return
            req, flags, size = struct.unpack("<III", data)
            payload = self.sock.recv(size, socket.MSG_WAITALL) if size else b""
            fds = array.array("i")
            for _, _, fdata in anc:
                fds.frombytes(fdata)
            self.messages.append((req, payload, list(fds)))
            if req == vu.SET_MEM_TABLE:
                self.mem_fd = fds[0]
            elif req in (vu.SET_VRING_KICK, vu.SET_VRING_CALL, vu.SET_VRING_ERR):
                self.fds[(req, struct.unpack("<Q", payload)[0] & 0xFF)] = fds[0]
            reply = {vu.GET_FEATURES: struct.pack("<Q", FEATURES),
                     vu.GET_PROTOCOL_FEATURES: struct.pack("<Q", self.protocol),
                     vu.GET_VRING_BASE: payload[:4] + struct.pack("<I", 7)}.get(req)
            if reply is None and flags & vu.FLAG_NEED_REPLY:
                reply = struct.pack("<Q", 0)
            if reply is not None:
                self.sock.sendall(struct.pack("<III", req, 1 | vu.FLAG_REPLY, len(reply)) + reply)

    def requests(self) -> list[int]:
        return [m[0] for m in self.messages]


@pytest.fixture
def rig() -> Any:
    ours, theirs = socket.socketpair()
    back = FakeBackEnd(theirs)
    back.start()
    front = VhostUserFrontEnd(ours, timeout=5)
    front.handshake()
    ram, fd = shared_ram(RAM_SIZE)
    bus = Bus(RAM, RAM_SIZE, ram, fd)
    dev = VirtioFs(front, "work", fd)
    events: list[str] = []
    irq = IrqLine(lambda level: events.append(f"irq {level}"))
    bus.add_mmio(MMIO, VirtioMmio.SIZE, VirtioMmio(dev, bus, irq), "virtio0")
    drv = MockVirtioDriver(bus, MMIO)
    yield bus, dev, events, drv, back
    dev.close()
    front.close()
    theirs.close()
    bus.close()


def test_config_space_and_features(rig: Any) -> None:
    bus, dev, irq, drv, back = rig
    assert drv.reg(0x008) == VIRTIO_ID_FS
    tag = bytes(drv.config_read(i, 1) for i in range(36))
    assert tag.rstrip(b"\0") == b"work"
    assert drv.config_read(36, 4) == 1                      # one request queue
    assert drv.device_features() == VIRTIO_F_VERSION_1       # no EVENT_IDX, no bit 30
    with pytest.raises(ConfigError):
        VirtioFs(dev.front, "x" * 37, bus.ram_fd)


def test_driver_ok_hands_the_back_end_ram_and_rings(rig: Any) -> None:
    bus, dev, irq, drv, back = rig
    qs = drv.init(queues=2)
    reqs = back.requests()
    assert reqs[:4] == [vu.SET_OWNER, vu.GET_FEATURES, vu.GET_PROTOCOL_FEATURES, vu.SET_PROTOCOL_FEATURES]
    assert vu.SET_MEM_TABLE in reqs and reqs.count(vu.SET_VRING_ENABLE) == 2
    feats = next(p for r, p, _ in back.messages if r == vu.SET_FEATURES)
    assert struct.unpack("<Q", feats)[0] == VIRTIO_F_VERSION_1 | vu.F_PROTOCOL_FEATURES
    addr = next(p for r, p, _ in back.messages if r == vu.SET_VRING_ADDR and p[:4] == b"\1\0\0\0")
    _, _, desc, used, avail, _ = struct.unpack("<IIQQQQ", addr)
    assert (desc, used, avail) == (qs[1].desc, qs[1].used, qs[1].avail)
    # the back end sees guest RAM through the descriptor: same bytes, both ways
    shared = mmap.mmap(back.mem_fd, RAM_SIZE)
    bus.write_bytes(RAM + 0x1000, b"from the guest")
    assert shared[0x1000:0x100E] == b"from the guest"
    shared[0x2000:0x2004] = b"back"
    assert bus.read_bytes(RAM + 0x2000, 4) == b"back"
    shared.close()
    # a QueueNotify is the ring's kick
    drv.kick(1)
    assert os.eventfd_read(back.fds[(vu.SET_VRING_KICK, 1)]) == 1


def test_what_the_back_end_writes_is_invalidated_and_marked_before_the_interrupt(rig: Any) -> None:
    bus, dev, irq, drv, back = rig
    qs = drv.init(queues=2)
    header = drv.buffer(b"request")
    page = drv.alloc(8192, 4096)
    out = drv.buffer(64, writable=True)
    head = qs[1].add([header, Buffer(page, 8192, True), out])
    seen: list[tuple[int, int]] = []
    order = irq                                  # (the rig's interrupt line records into it)
    order.clear()
    bus.watch(page >> 12, lambda a, n: (seen.append((a, n)), order.append("invalidate")))
    bus.watch((page >> 12) + 1, lambda a, n: seen.append((a, n)))
    bus.start_dirty_log()
    # the back end (another process) writes the page and the used ring, then calls
    shared = mmap.mmap(back.mem_fd, RAM_SIZE)
    shared[page - RAM:page - RAM + 5] = b"code2"
    used = qs[1].used - RAM
    shared[used + 4:used + 12] = struct.pack("<II", head, 8192 + 64)
    shared[used + 2:used + 4] = struct.pack("<H", 1)
    shared.close()
    os.eventfd_write(back.fds[(vu.SET_VRING_CALL, 1)], 1)
    dev.poll()
    assert (page, 8192) in seen and len(seen) == 2          # both pages' watchers
    assert order[0] == "invalidate" and "irq True" in order
    dirty = bus.harvest_dirty()
    assert {(page - RAM) >> 12, ((page - RAM) >> 12) + 1, (out.addr - RAM) >> 12} <= dirty
    assert drv.interrupt_status() & 1
    # no call and nothing new: nothing walked, no interrupt
    drv.ack_interrupt()
    seen.clear()
    dev.poll()
    assert seen == [] and drv.interrupt_status() == 0


def test_used_entries_a_guest_scribbled_are_bounded_and_skipped(rig: Any) -> None:
    bus, dev, irq, drv, back = rig
    qs = drv.init(queues=2)
    used = qs[1].used
    for k in range(qs[1].size):                  # every head out of range
        bus.write(used + 4 + 8 * k, 4, 0xFFFF_FFFF)
    bus.write(used + 2, 2, 0xFFFF)               # the index far ahead
    assert dev.mark_used(1) == qs[1].size        # bounded by the queue size, nothing raised
    assert not dev.status & STATUS_DEVICE_NEEDS_RESET


def test_reset_stops_the_rings(rig: Any) -> None:
    bus, dev, irq, drv, back = rig
    drv.init(queues=2)
    drv.reset()
    assert back.requests().count(vu.GET_VRING_BASE) == 2
    assert dev.started == []


def test_a_back_end_that_goes_away_needs_a_reset(rig: Any) -> None:
    bus, dev, irq, drv, back = rig
    drv.init(queues=2)
    back.sock.shutdown(socket.SHUT_RDWR)         # virtiofsd ended
    dev.poll()
    assert dev.status & STATUS_DEVICE_NEEDS_RESET


def test_a_restored_device_hands_its_rings_where_they_stand_to_a_fresh_back_end(rig: Any) -> None:
    bus, dev, irq, drv, back = rig
    qs = drv.init(queues=2)
    for _ in range(3):                           # three requests made available...
        qs[1].add([drv.buffer(b"request"), drv.buffer(64, writable=True)])
    assert dev.in_flight() == 3                  # ...none answered: a snapshot must wait
    bus.write(qs[1].used + 2, 2, 3)              # the back end answered them all
    assert dev.in_flight() == 0
    state = dev.save()

    ours, theirs = socket.socketpair()           # the restored VM's own virtiofsd
    fresh = FakeBackEnd(theirs)
    fresh.start()
    front = VhostUserFrontEnd(ours, timeout=5)
    front.handshake()
    restored = VirtioFs(front, "work", bus.ram_fd)
    restored.attach(bus, lambda bits: None)
    restored.load(state)
    try:
        assert restored.started == [0, 1]
        bases = {struct.unpack("<II", p)[0]: struct.unpack("<II", p)[1]
                 for r, p, _ in fresh.messages if r == vu.SET_VRING_BASE}
        assert bases == {0: 0, 1: 3}             # ring 1 goes on after the 3 answered requests
        assert vu.SET_MEM_TABLE in fresh.requests() and fresh.mem_fd >= 0
        restored.notify(1)                       # the driver's next kick reaches the new back end
        assert os.eventfd_read(fresh.fds[(vu.SET_VRING_KICK, 1)]) == 1
        assert restored.seen_used == [0, 3]      # and the coherence walk starts from there
    finally:
        restored.close()
        front.close()
        theirs.close()


def _answer(reply: bytes) -> VhostUserFrontEnd:
    """A front end whose peer answers every message with `reply`, as is."""
    ours, theirs = socket.socketpair()

    def serve() -> None:
        try:
            theirs.recv(4096)
            theirs.sendall(reply)
        except OSError:
            pass
    threading.Thread(target=serve, daemon=True).start()
    front = VhostUserFrontEnd(ours, timeout=1)
    front._peer = theirs  # type: ignore[attr-defined]     # (kept open)
    return front


@pytest.mark.parametrize("reply, words", [
    (struct.pack("<III", vu.GET_FEATURES, 5, 4) + b"1234", "of 4 bytes, expected 8"),
    (struct.pack("<III", vu.GET_FEATURES, 5, 1 << 31), "expected 8"),
    (struct.pack("<III", vu.SET_OWNER, 5, 8) + bytes(8), "reply to request 3, expected 1"),
    (struct.pack("<III", vu.GET_FEATURES, 1, 8) + bytes(8), "not version 1, reply"),
    (struct.pack("<III", vu.GET_FEATURES, 5, 8) + b"123", "no reply"),
    (b"", "no reply"),
])
def test_a_hostile_back_end_is_one_error(reply: bytes, words: str) -> None:
    front = _answer(reply)
    with pytest.raises(VhostUserError, match=words):
        front.get_u64(vu.GET_FEATURES)
    with pytest.raises(VhostUserError):            # and the front end stays unusable
        front.get_u64(vu.GET_FEATURES)
    front.close()


def test_descriptors_in_a_reply_are_closed() -> None:
    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    msg = struct.pack("<III", vu.GET_FEATURES, 5, 8) + struct.pack("<Q", 1 << 32)
    theirs.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())])
    os.close(w)
    front = VhostUserFrontEnd(ours, timeout=1)
    assert front._receive(vu.GET_FEATURES, 8) == struct.pack("<Q", 1 << 32)
    assert os.read(r, 1) == b""                 # the only write end was the one we got: closed
    os.close(r)
    front.close()
    theirs.close()


def test_the_dirty_log_records_dma_pages() -> None:
    bus = Bus(RAM, RAM_SIZE)
    bus.dma_written(RAM, 10)
    assert bus.dirty_log is None                 # no log: nothing kept
    bus.start_dirty_log()
    bus.dma_written(RAM + 0x1FFF, 2)             # straddles pages 1 and 2
    bus.mark_dirty(RAM + RAM_SIZE - 1, 100)      # clipped at the end of RAM
    assert bus.harvest_dirty() == {1, 2, RAM_SIZE // 4096 - 1}
    assert bus.harvest_dirty() == set()
    bus.stop_dirty_log()
    assert bus.dirty_log is None
