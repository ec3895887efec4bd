"""Token buckets on a mock clock, and rate-limited virtio-blk / virtio-net: a refused request
stays on its queue (the VMM is not blocked), the device names a deadline, and the request
completes once the clock has passed it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_virtio_net import MAC, FakeBackend, frame

from pyvirt.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VirtioBlk
from pyvirt.devices.virtio.net import HDR_SIZE, VirtioNet
from pyvirt.ratelimit import RateLimiter, TokenBucket
from pyvirt.testing.clock import MockClock
from pyvirt.testing.fakes import MemoryBlockBackend
from pyvirt.testing.virtio_rig import make_rig

HZ = 1000          # a coarse clock keeps the arithmetic readable: 1 tick = 1 ms


def test_bucket_refills_at_rate_and_caps_at_size() -> None:
    clock = MockClock(hz=HZ)
    b = TokenBucket(clock, rate=1000, size=500)
    assert b.tokens() == 500 and b.consume(500) and not b.consume(1)
    clock.advance(100)                               # 0.1 s: 100 tokens
    assert b.tokens() == 100 and not b.consume(101) and b.consume(100)
    clock.advance(10_000)
    assert b.tokens() == 500                         # never more than size


def test_one_time_burst_is_spent_first_and_never_refills() -> None:
    clock = MockClock(hz=HZ)
    b = TokenBucket(clock, rate=100, size=100, burst=1000)
    assert b.consume(1000) and b.tokens() == 100 and b.consume(100) and not b.consume(1)
    clock.advance(10_000)
    assert b.burst == 0 and b.tokens() == 100 and b.consume(100) and not b.consume(1)


def test_oversized_request_waits_for_a_full_bucket_then_leaves_debt() -> None:
    clock = MockClock(hz=HZ)
    b = TokenBucket(clock, rate=1000, size=100)
    b.consume(50)
    assert not b.consume(300)
    at = b.ready_at(300)
    assert at == 50                                  # 50 more tokens at 1000/s: 50 ms
    clock.advance(at)
    assert b.consume(300)                            # full bucket: let through, 200 in debt
    assert b.ready_at(1) == at + 201
    clock.advance(200)
    assert not b.consume(1)
    clock.advance(1)
    assert b.consume(1)


def test_ready_at_is_exact() -> None:
    clock = MockClock(hz=HZ)
    b = TokenBucket(clock, rate=3, size=10)
    b.consume(10)
    at = b.ready_at(2)                               # 2 tokens at 3/s: 667 ms, rounded up
    assert at == 667
    clock.advance(at - 1)
    assert not b.can(2)
    clock.advance(1)
    assert b.consume(2)


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 10_000), size=st.integers(1, 5_000), burst=st.integers(0, 3000),
       steps=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 5_000)), min_size=1, max_size=60))
def test_consumption_never_exceeds_size_plus_rate_times_time(rate, size, burst, steps) -> None:
    """Over any interval [i, j] of the run, tokens taken <= burst + size + rate x time."""
    clock = MockClock(hz=HZ)
    b = TokenBucket(clock, rate=rate, size=size, burst=burst)
    log: list[tuple[int, int]] = []                  # (tick, tokens taken)
    for dt, want in steps:
        clock.advance(dt)
        n = min(want, size + b.burst)                # requests never larger than the bucket
        if b.consume(n):
            log.append((clock.ticks(), n))
    for i in range(len(log)):
        total = 0
        for j in range(i, len(log)):
            total += log[j][1]
            elapsed = log[j][0] - log[i][0]
            assert total * HZ <= (burst + size) * HZ + rate * elapsed


def test_limiter_takes_from_both_buckets_or_neither() -> None:
    clock = MockClock(hz=HZ)
    lim = RateLimiter.build(clock, bw=10_000, ops=10)        # sizes: 1000 bytes, 1 op
    assert lim is not None and RateLimiter.build(clock) is None
    assert lim.consume(100) and not lim.blocked
    assert not lim.consume(100)                              # no op left; bytes untouched
    assert lim.blocked and lim.bandwidth.tokens() == 900
    assert lim.ready_at() == 100 and lim.wake_at() == 100 and not lim.due()
    clock.advance(100)
    assert lim.due() and lim.wake_at() is None
    assert lim.consume(100) and not lim.blocked and lim.ready_at() is None


# -- virtio-blk ----------------------------------------------------------------------------
def read_request(rig, q, sector: int, length: int):
    drv = rig.drv
    status = drv.buffer(b"\xff", writable=True)
    data = drv.buffer(length, writable=True)
    head = q.add([drv.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector)), data, status])
    return head, data, status


def test_throttled_blk_request_is_deferred_then_completed() -> None:
    clock = MockClock(hz=HZ)
    disk = bytes(range(256)) * 4096
    blk = VirtioBlk(MemoryBlockBackend(data=disk), limiter=RateLimiter.build(clock, bw=40_960))
    rig = make_rig(blk)                                      # bucket: 4096 bytes (100 ms)
    (q,) = rig.drv.init()
    first = read_request(rig, q, 0, 4096)
    second = read_request(rig, q, 8, 4096)
    rig.drv.kick()
    assert [h for h, _ in q.used_entries()] == [first[0]]   # the second waits on the ring
    assert blk.next_deadline() == 100                        # 4096 bytes at 40960/s
    blk.poll()
    assert q.used_entries() == []
    rig.drv.kick()                                           # a kick while throttled: still waits
    assert q.used_entries() == []
    clock.advance(99)
    blk.poll()
    assert q.used_entries() == []
    clock.advance(1)
    blk.poll()
    assert q.used_entries() == [(second[0], 4097)]
    assert rig.drv.read(second[2]) == bytes([VIRTIO_BLK_S_OK])
    assert rig.drv.read(second[1]) == disk[4096:8192]
    assert blk.next_deadline() is None and not rig.bus.stray


def test_blk_iops_limit() -> None:
    clock = MockClock(hz=HZ)
    blk = VirtioBlk(MemoryBlockBackend(), limiter=RateLimiter.build(clock, ops=20))   # 2 at once
    rig = make_rig(blk)
    (q,) = rig.drv.init()
    heads = [read_request(rig, q, i, 512)[0] for i in range(5)]
    rig.drv.kick()
    done = [h for h, _ in q.used_entries()]
    assert done == heads[:2]
    while len(done) < 5:
        deadline = blk.next_deadline()
        assert deadline is not None and deadline > clock.ticks()
        clock.advance(deadline - clock.ticks())
        blk.poll()
        done += [h for h, _ in q.used_entries()]
    assert done == heads and clock.ticks() == 150           # 3 more ops at 20/s


# -- virtio-net ----------------------------------------------------------------------------
def net_guest(clock: MockClock, tx: int | None = None, rx: int | None = None):
    backend = FakeBackend()
    nic = VirtioNet(backend, MAC, RateLimiter.build(clock, tx), RateLimiter.build(clock, rx))
    rig = make_rig(nic)
    rxq, txq = rig.drv.init(queues=2)
    return backend, nic, rig, rxq, txq


def test_net_tx_throttled_and_resumed() -> None:
    clock = MockClock(hz=HZ)
    backend, nic, rig, _rxq, txq = net_guest(clock, tx=15_000)      # bucket 1500 bytes
    frames = [frame(1000, i) for i in range(3)]
    for f in frames:
        txq.add([rig.drv.buffer(bytes(HDR_SIZE) + f)])
    rig.drv.kick(1)
    assert backend.sent == frames[:1]
    assert nic.next_deadline() == 34                         # 500 more bytes at 15000/s
    clock.advance(34)
    nic.poll()
    assert backend.sent == frames[:2]
    clock.advance(10_000)
    nic.poll()
    assert backend.sent == frames and len(txq.used_entries()) == 3


def test_net_rx_throttled_frames_wait_in_pending() -> None:
    clock = MockClock(hz=HZ)
    backend, nic, rig, rxq, _txq = net_guest(clock, rx=10_000)      # bucket 1000 bytes
    posted = [(rxq.add([b := rig.drv.buffer(2048, writable=True)]), b) for _ in range(4)]
    rig.drv.kick(0)
    backend.inbox = [frame(600, i) for i in range(3)]
    nic.poll()
    assert len(rxq.used_entries()) == 1 and len(nic.pending) == 2
    deadline = nic.next_deadline()
    assert deadline == 20                                     # 200 more bytes at 10000/s
    clock.advance(deadline)
    nic.poll()
    got = rxq.used_entries()
    assert len(got) == 1
    assert rig.drv.read(dict(posted)[got[0][0]], got[0][1])[HDR_SIZE:] == frame(600, 1)
    clock.advance(1000)
    nic.poll()
    assert len(rxq.used_entries()) == 1 and not nic.pending and nic.next_deadline() is None


@pytest.mark.parametrize("text, field, value", [
    ("/d,bw=2M", "bw", 2 << 20), ("/d,iops=500", "iops", 500), ("/d,bw=1k,burst=4M", "burst", 4 << 20),
])
def test_disk_limit_options(text: str, field: str, value: int) -> None:
    from pyvirt.spec import DiskSpec
    assert getattr(DiskSpec.parse(text), field) == value


def test_blk_discard_and_write_zeroes_are_charged_for_their_range() -> None:
    """DISCARD and WRITE_ZEROES move (or free) the bytes their segments cover: the bw limit
    charges those, not the 16-byte segment list (issue 14)."""
    from pyvirt.devices.virtio.blk import VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES
    clock = MockClock(hz=HZ)
    blk = VirtioBlk(MemoryBlockBackend(data=bytes(1 << 20)), limiter=RateLimiter.build(clock, bw=40_960))
    rig = make_rig(blk)                                      # bucket: 4096 bytes (100 ms)
    (q,) = rig.drv.init()
    drv = rig.drv
    heads = []
    for kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        seg = struct.pack("<QII", 0, 1024, 0)                # 512 KiB
        heads.append(q.add([drv.buffer(struct.pack("<IIQ", kind, 0, 0)), drv.buffer(seg),
                            drv.buffer(b"\xff", writable=True)]))
    drv.kick()
    assert [h for h, _ in q.used_entries()] == [heads[0]]   # the first goes through, into debt
    assert blk.next_deadline() >= (512 << 10) * HZ // 40_960 - 100     # ~12.8 s of debt to repay
    clock.advance(12_700)
    blk.poll()
    assert q.used_entries() == []
    clock.advance(500)
    blk.poll()
    assert [h for h, _ in q.used_entries()] == [heads[1]]
