"""virtio-net driven by the mock driver: configuration, transmit and receive (mergeable and
single buffers), back-pressure both ways, and a hostile driver that must not crash the VMM."""

from __future__ import annotations

import struct

import pytest

from pyvirt.devices.virtio import net as net_mod
from pyvirt.devices.virtio.device import INT_CONFIG, INT_USED, STATUS_DEVICE_NEEDS_RESET, VIRTIO_F_EVENT_IDX
from pyvirt.devices.virtio.net import (
    HDR_SIZE,
    MAX_PENDING_FRAMES,
    POLL_FRAMES,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VirtioNet,
    parse_mac,
)
from pyvirt.devices.virtio.queue import vring_need_event
from pyvirt.testing.virtio_rig import RAM, make_rig
from pyvirt.testing.virtq import Buffer

MAC = bytes.fromhex("525400123456")
HDR = struct.Struct("<BBHHHHH")


def frame(n: int, seed: int = 0) -> bytes:
    """An n-byte 'Ethernet frame': broadcast destination, our source, then a pattern."""
    head = b"\xff" * 6 + MAC + b"\x08\x00"
    body = bytes((seed + i) & 0xFF for i in range(max(0, n - len(head))))
    return (head + body)[:n]


class FakeBackend:
    def __init__(self) -> None:
        self.link_up = True
        self.sent: list[bytes] = []
        self.inbox: list[bytes] = []
        self.accepting = True
        self.closed = False
        self.flushes = 0
        self.fd: int | None = None

    def send(self, data: bytes) -> bool:
        if not self.accepting:
            return False
        self.sent.append(bytes(data))
        return True

    def recv(self, limit: int) -> list[bytes]:
        out, self.inbox = self.inbox[:limit], self.inbox[limit:]
        return out

    def flush(self) -> None:
        self.flushes += 1

    def fileno(self) -> int | None:
        return self.fd

    def close(self) -> None:
        self.closed = True


class Guest:
    def __init__(self, mergeable: bool = True, queue_size: int | None = None, event_idx: bool = True) -> None:
        self.backend = FakeBackend()
        self.rig = make_rig(VirtioNet(self.backend, MAC))
        self.dev: VirtioNet = self.rig.device
        drv = self.rig.drv
        accept = drv.device_features()
        if not mergeable:
            accept &= ~VIRTIO_NET_F_MRG_RXBUF
        if not event_idx:
            accept &= ~VIRTIO_F_EVENT_IDX
        self.qs = drv.init(accept=accept, queues=2, queue_size=queue_size)
        self.rx, self.tx = self.qs

    def transmit(self, data: bytes, hdr: bytes | None = None, split: bool = False) -> None:
        hdr = HDR.pack(0, 0, 0, 0, 0, 0, 0) if hdr is None else hdr
        drv = self.rig.drv
        bufs = [drv.buffer(hdr), drv.buffer(data)] if split else [drv.buffer(hdr + data)]
        self.tx.add(bufs)
        drv.kick(1)

    def post_rx(self, size: int, count: int = 1) -> list[tuple[int, Buffer]]:
        posted = []
        for _ in range(count):
            b = self.rig.drv.buffer(size, writable=True)
            posted.append((self.rx.add([b]), b))
        self.rig.drv.kick(0)
        return posted

    def received(self, posted: list[tuple[int, Buffer]]) -> list[bytes]:
        """Reassemble frames from the used ring (num_buffers in each first header)."""
        bufs = dict(posted)
        entries = self.rx.used_entries()
        frames = []
        i = 0
        while i < len(entries):
            head, n = entries[i]
            data = self.rig.drv.read(bufs[head], n)
            count = HDR.unpack(data[:HDR_SIZE])[6] if len(data) >= HDR_SIZE else 1
            for head2, n2 in entries[i + 1:i + count]:
                data += self.rig.drv.read(bufs[head2], n2)
            i += count
            assert HDR.unpack(data[:HDR_SIZE])[:6] == (0, 0, 0, 0, 0, 0)
            frames.append(data[HDR_SIZE:])
        return frames

    def sane(self) -> None:
        assert not self.rig.bus.stray


def test_features_and_config() -> None:
    g = Guest()
    feats = g.rig.drv.features
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU, VIRTIO_NET_F_MRG_RXBUF):
        assert feats & bit
    assert bytes(g.rig.drv.config_read(i, 1) for i in range(6)) == MAC
    assert g.rig.drv.config_read(6, 2) == 1               # VIRTIO_NET_S_LINK_UP
    assert g.rig.drv.config_read(10, 2) == 1500            # mtu
    assert parse_mac("52:54:00:12:34:56") == MAC


@pytest.mark.parametrize("split", [False, True])
def test_transmit_reaches_backend_byte_exact(split: bool) -> None:
    g = Guest()
    frames = [frame(60, 1), frame(1514, 2), frame(14, 3), frame(65535, 4)]
    for f in frames:
        g.transmit(f, split=split)
    assert g.backend.sent == frames
    assert [n for _, n in g.tx.used_entries()] == [0] * 4
    assert g.dev.stats["tx_frames"] == 4 and g.dev.stats["tx_dropped"] == 0
    assert g.rig.irq.level or g.rig.drv.interrupt_status() & INT_USED
    assert g.backend.flushes == 4                   # a kick's frame is written at once
    g.sane()


def driver_kicks_tx(g: Guest, old: int) -> bool:
    """Linux's kick decision for the transmit entries made available since `old`."""
    q = g.tx
    if q.event_idx:
        return vring_need_event(q.avail_event(), q.avail_idx, old)
    return not g.rig.bus.read(q.used, 2) & 1              # VIRTQ_USED_F_NO_NOTIFY


@pytest.mark.parametrize("event_idx", [True, False])
def test_a_quiet_transmit_queue_asks_for_a_kick_and_sends_at_once(event_idx: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """While frames flow, poll() sends them and the driver is asked for no kicks; once the
    queue has been quiet for TX_QUIET, the next frame kicks and goes out at once, not at the end of the
    slice (a ping's request and reply each waited up to a slice), and the frames after it
    wait for the poll again."""
    g = Guest(event_idx=event_idx)
    assert g.tx.event_idx == event_idx
    drv = g.rig.drv
    clock = [100.0]
    monkeypatch.setattr(net_mod.time, "monotonic", lambda: clock[0])
    g.dev.poll()                                          # quiet: the next frame should kick
    for round_ in range(3):
        old = g.tx.avail_idx
        g.tx.add([drv.buffer(HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame(60, round_))])
        assert driver_kicks_tx(g, old), round_
        flushes = g.backend.flushes
        drv.kick(1)
        assert g.backend.sent[-1] == frame(60, round_) and g.backend.flushes == flushes + 1
        old = g.tx.avail_idx                              # a burst follows: no more kicks
        for i in range(3):
            g.tx.add([drv.buffer(HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame(61, i))])
        assert not driver_kicks_tx(g, old)
        g.dev.poll()                                      # the poll sends them ...
        assert g.backend.sent[-3:] == [frame(61, i) for i in range(3)]
        g.tx.used_entries()
        old = g.tx.avail_idx                              # ... and, busy, asks for no kick yet
        g.tx.add([drv.buffer(HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame(62, 0))])
        assert not driver_kicks_tx(g, old)
        g.dev.poll()                                      # sent; polls after it are quiet ...
        g.tx.used_entries()
        clock[0] += net_mod.TX_QUIET / 2
        g.dev.poll()
        old = g.tx.avail_idx                              # ... but not yet for long enough
        g.tx.add([drv.buffer(HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame(63, 0))])
        assert not driver_kicks_tx(g, old)
        g.dev.poll()
        g.tx.used_entries()
        clock[0] += 2 * net_mod.TX_QUIET
        g.dev.poll()
    g.sane()


@pytest.mark.parametrize("data, hdr", [
    (frame(13), None),                                          # shorter than an Ethernet header
    (b"", None),
    (frame(65536), None),                                       # longer than 65535
    (frame(100), HDR.pack(1, 0, 0, 0, 14, 16, 0)),              # NEEDS_CSUM: never offered
    (frame(100), HDR.pack(0, 1, 54, 1448, 0, 0, 0)),            # TSO4: never offered
    (b"", b"\x00" * 5),                                         # not even a header
])
def test_bad_transmit_frames_are_dropped(data: bytes, hdr: bytes | None) -> None:
    g = Guest()
    g.transmit(data, hdr=hdr)
    assert g.backend.sent == [] and g.dev.stats["tx_dropped"] == 1
    assert len(g.tx.used_entries()) == 1                        # the chain still comes back
    assert not g.dev.status & STATUS_DEVICE_NEEDS_RESET
    g.transmit(frame(60))
    assert g.backend.sent == [frame(60)]
    g.sane()


def test_receive_mergeable_over_small_buffers() -> None:
    g = Guest()
    posted = g.post_rx(64, count=40)
    f = frame(1000, 7)
    g.backend.inbox.append(f)
    g.dev.poll()
    entries = g.rx.used_entries()
    assert len(entries) == 16                                  # ceil((12 + 1000) / 64)
    assert [n for _, n in entries] == [64] * 15 + [1012 - 15 * 64]
    bufs = dict(posted)
    data = b"".join(g.rig.drv.read(bufs[h], n) for h, n in entries)
    assert HDR.unpack(data[:HDR_SIZE])[6] == 16                # num_buffers
    assert data[HDR_SIZE:] == f
    assert g.rig.drv.interrupt_status() & INT_USED
    g.sane()


def test_receive_header_split_across_buffers() -> None:
    g = Guest()
    posted = g.post_rx(5, count=32)                            # smaller than the header
    f = frame(60, 9)
    g.backend.inbox.append(f)
    g.dev.poll()
    entries = g.rx.used_entries()
    assert len(entries) == 15                                  # ceil(72 / 5)
    bufs = dict(posted)
    data = b"".join(g.rig.drv.read(bufs[h], n) for h, n in entries)
    assert HDR.unpack(data[:HDR_SIZE])[6] == 15 and data[HDR_SIZE:] == f
    g.sane()


def test_receive_several_frames_mergeable() -> None:
    g = Guest()
    posted = g.post_rx(2048, count=8)
    fs = [frame(60, 1), frame(1514, 2), frame(3000, 3)]
    g.backend.inbox += fs
    g.dev.poll()
    assert g.received(posted) == fs
    assert g.dev.stats["rx_frames"] == 3


@pytest.mark.parametrize("mergeable", [True, False])
def test_receive_frames_in_order_whether_a_buffer_holds_them_or_not(mergeable: bool) -> None:
    """Frames that fit one buffer and frames that need several (or are dropped, without
    mergeable buffers) interleave: each lands whole, in order, and the bytes written are
    what the used ring says."""
    g = Guest(mergeable=mergeable)
    sizes = [1024, 1024, 4096, 1024, 4096, 1024, 1024, 1024]
    posted: list[tuple[int, Buffer]] = []
    for size in sizes:
        posted += g.post_rx(size)
    fs = [frame(1000, 1), frame(1500, 2), frame(60, 3), frame(2000, 4), frame(1010, 5)]
    g.backend.inbox += fs
    g.dev.poll()
    if mergeable:
        # 1000 in one buffer, 1500 over the next two (1024 + 4096), then one each
        assert g.received(posted) == fs
        assert g.dev.stats["rx_frames"] == 5 and g.dev.stats["rx_dropped"] == 0
    else:
        # one buffer a frame: 1500 + 12 does not fit the second, dropped; 60 takes that one
        assert g.received(posted) == [fs[0], fs[2], fs[3], fs[4]]
        assert g.dev.stats["rx_dropped"] == 1
    g.sane()


def test_receive_without_mergeable_needs_one_big_buffer() -> None:
    g = Guest(mergeable=False)
    assert not g.dev.negotiated(VIRTIO_NET_F_MRG_RXBUF)
    small = g.post_rx(100)
    g.backend.inbox += [frame(500, 1), frame(60, 2)]
    g.dev.poll()
    # the 500-byte frame cannot fit in a 100-byte buffer: dropped; the small one fits
    assert g.received(small) == [frame(60, 2)]
    assert g.dev.stats["rx_dropped"] == 1
    g.sane()


def test_receive_waits_for_buffers_and_holds_the_backend_back() -> None:
    g = Guest()
    g.backend.inbox += [frame(60, i) for i in range(MAX_PENDING_FRAMES + 10)]
    for _ in range(MAX_PENDING_FRAMES // POLL_FRAMES + 3):
        g.dev.poll()
    assert len(g.dev.pending) == MAX_PENDING_FRAMES
    assert len(g.backend.inbox) == 10 and g.dev.stats["rx_dropped"] == 0    # left in the back end
    assert g.rx.used_entries() == []
    posted = g.post_rx(128, count=4)                           # the kick delivers at once
    assert g.received(posted) == [frame(60, i) for i in range(4)]
    assert len(g.dev.pending) == MAX_PENDING_FRAMES - 4
    g.dev.poll()                                               # room for 4 more: taken in order
    assert len(g.dev.pending) == MAX_PENDING_FRAMES and len(g.backend.inbox) == 6
    posted = g.post_rx(128, count=MAX_PENDING_FRAMES)
    g.dev.poll()
    g.dev.poll()
    assert g.received(posted) == [frame(60, i) for i in range(4, MAX_PENDING_FRAMES + 4)]
    assert g.dev.stats["rx_dropped"] == 0


def test_full_receive_queue_leaves_the_backend_out_of_the_idle_wait() -> None:
    g = Guest()
    g.backend.fd = 7
    assert g.dev.wait_fds() == [7]
    g.backend.inbox += [frame(60, i) for i in range(MAX_PENDING_FRAMES)]
    for _ in range(MAX_PENDING_FRAMES // POLL_FRAMES):
        g.dev.poll()
    assert len(g.dev.pending) == MAX_PENDING_FRAMES
    assert g.dev.wait_fds() == []                              # nothing to take: no wake-ups
    g.received(g.post_rx(128, count=1))
    assert g.dev.wait_fds() == [7]


def test_frame_larger_than_every_buffer_is_dropped() -> None:
    g = Guest(queue_size=4)
    posted = g.post_rx(16, count=4)                            # 64 bytes in all
    g.backend.inbox += [frame(1000), frame(40, 5)]
    g.dev.poll()
    assert g.dev.stats["rx_dropped"] == 1
    assert g.received(posted) == [frame(40, 5)]                # 52 bytes: 4 buffers


def test_congested_backend_holds_transmissions_back() -> None:
    g = Guest()
    g.backend.accepting = False
    g.transmit(frame(60, 1))
    g.transmit(frame(60, 2))
    assert g.backend.sent == [] and g.tx.used_entries() == []
    g.backend.accepting = True
    g.dev.poll()
    assert g.backend.sent == [frame(60, 1), frame(60, 2)]
    assert len(g.tx.used_entries()) == 2


def test_link_down_is_reported() -> None:
    g = Guest()
    g.rig.drv.ack_interrupt()
    generation = g.rig.drv.config_generation()
    g.backend.link_up = False
    g.dev.poll()
    assert g.rig.drv.config_read(6, 2) == 0
    assert g.rig.drv.interrupt_status() & INT_CONFIG
    assert g.rig.drv.config_generation() != generation


def test_frames_before_driver_ok_are_dropped() -> None:
    backend = FakeBackend()
    rig = make_rig(VirtioNet(backend, MAC))
    backend.inbox.append(frame(60))
    rig.device.poll()
    assert backend.inbox == [] and rig.device.stats["rx_dropped"] == 1


# -- a hostile driver ----------------------------------------------------------------------------
def test_device_writable_transmit_buffer_is_dropped() -> None:
    g = Guest()
    drv = g.rig.drv
    g.tx.add([drv.buffer(HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame(60)), drv.buffer(64, writable=True)])
    drv.kick(1)
    assert g.backend.sent == [] and g.dev.stats["tx_dropped"] == 1
    assert not g.dev.status & STATUS_DEVICE_NEEDS_RESET
    g.transmit(frame(60))
    assert g.backend.sent == [frame(60)]
    g.sane()


def test_readable_only_receive_buffer_does_not_crash() -> None:
    g = Guest()
    g.rx.add([g.rig.drv.buffer(64)])                            # device-readable: useless for rx
    posted = g.post_rx(2048, count=2)
    g.backend.inbox.append(frame(100))
    g.dev.poll()
    assert not g.dev.status & STATUS_DEVICE_NEEDS_RESET
    entries = g.rx.used_entries()
    assert entries[0][1] == 0                                   # nothing written to it
    bufs = dict(posted)
    data = b"".join(g.rig.drv.read(bufs[h], n) for h, n in entries[1:])
    assert data[HDR_SIZE:] == frame(100)
    g.sane()


@pytest.mark.parametrize("queue", [0, 1])
def test_buffer_outside_ram_needs_reset(queue: int) -> None:
    g = Guest()
    q = g.qs[queue]
    head = q.free.pop(0)
    flags = 2 if queue == 0 else 0
    q.write_desc(head, RAM - 4096, 64, flags, 0)                # below RAM
    q.publish(head)
    g.rig.drv.kick(queue)
    g.backend.inbox.append(frame(60))
    g.dev.poll()
    assert g.dev.status & STATUS_DEVICE_NEEDS_RESET
    assert g.backend.sent == []
    g.dev.poll()                                                # still no exception
    g.sane()


def test_descriptor_loop_on_receive_needs_reset() -> None:
    g = Guest()
    head = g.rx.free.pop(0)
    buf = g.rig.drv.buffer(32, writable=True)
    g.rx.write_desc(head, buf.addr, buf.length, 1 | 2, head)    # NEXT to itself
    g.rx.publish(head)
    g.backend.inbox.append(frame(60))
    g.dev.poll()
    assert g.dev.status & STATUS_DEVICE_NEEDS_RESET
    g.sane()


def test_reset_clears_pending_frames() -> None:
    g = Guest()
    g.backend.inbox.append(frame(60))
    g.dev.poll()
    assert len(g.dev.pending) == 1
    g.rig.drv.reset()
    assert len(g.dev.pending) == 0
    state = g.dev.save()
    g.dev.load(state)
