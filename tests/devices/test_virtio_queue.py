"""The split-virtqueue parser (virtio 1.2, 2.7), friendly and hostile."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirt.devices.virtio.queue import (
    QueueError,
    SplitQueue,
    split_spans,
    vring_need_event,
)
from pyvirt.testing.virtio_rig import RAM, GuardedBus
from pyvirt.testing.virtq import F_INDIRECT, F_NEXT, F_WRITE, Buffer, GuestAllocator, MockQueue

RAM_SIZE = 1 << 20
END = RAM + RAM_SIZE


def make(size: int = 8, event_idx: bool = False) -> tuple[GuardedBus, MockQueue, SplitQueue]:
    bus = GuardedBus(RAM, RAM_SIZE)
    mock = MockQueue(bus, GuestAllocator(RAM, 0x10000), 0, size, event_idx)
    q = SplitQueue(256, bus)
    q.size, q.desc, q.avail, q.used = size, mock.desc, mock.avail, mock.used
    q.enable(event_idx)
    assert not q.broken
    return bus, mock, q


def test_chain_readable_then_writable() -> None:
    _, mock, q = make()
    head = mock.add([Buffer(RAM + 0x20000, 16), Buffer(RAM + 0x21000, 100),
                     Buffer(RAM + 0x22000, 512, True), Buffer(RAM + 0x23000, 1, True)])
    c = q.pop()
    assert c is not None and c.head == head
    assert c.readable == [(RAM + 0x20000, 16), (RAM + 0x21000, 100)] and c.readable_len == 116
    assert c.writable == [(RAM + 0x22000, 512), (RAM + 0x23000, 1)] and c.writable_len == 513
    assert q.pop() is None
    q.push(c.head, 513)
    assert mock.used_entries() == [(head, 513)]


def test_indirect_table() -> None:
    _, mock, q = make()
    bufs = [Buffer(RAM + 0x20000 + 0x100 * i, 0x100, i >= 3) for i in range(6)]
    head = mock.add(bufs, indirect=True)
    c = q.pop()
    assert c is not None and c.head == head
    assert len(c.readable) == 3 and len(c.writable) == 3 and c.writable_len == 0x300


def test_direct_descriptors_then_indirect() -> None:
    bus, mock, q = make()
    table = RAM + 0x30000
    bus.write_bytes(table, struct.pack("<QIHH", RAM + 0x22000, 64, F_WRITE, 0))
    mock.write_desc(0, RAM + 0x20000, 16, F_NEXT, 1)
    mock.write_desc(1, table, 16, F_INDIRECT, 0)
    mock.publish(0)
    c = q.pop()
    assert c is not None and c.readable == [(RAM + 0x20000, 16)] and c.writable == [(RAM + 0x22000, 64)]


def test_avail_index_wraps() -> None:
    _, mock, q = make(size=4)
    mock.set_avail_idx(0xFFFE)
    q.last_avail = q.used_idx = 0xFFFE
    heads = [mock.add([Buffer(RAM + 0x20000, 8, True)]) for _ in range(3)]
    got = []
    while (c := q.pop()) is not None:
        got.append(c.head)
        q.push(c.head, 8)
    assert got == heads and q.last_avail == 1 and q.used_idx == 1


def test_no_interrupt_flag_without_event_idx() -> None:
    _, mock, q = make()
    mock.add([Buffer(RAM + 0x20000, 8, True)])
    q.push(q.pop().head, 8)  # type: ignore[union-attr]
    assert q.should_notify()
    assert not q.should_notify()                  # nothing new since
    mock.set_avail_flags(1)
    mock.add([Buffer(RAM + 0x20000, 8, True)])
    q.push(q.pop().head, 8)  # type: ignore[union-attr]
    assert not q.should_notify()


def driver_kicks(q: SplitQueue, mock: MockQueue, old: int) -> bool:
    """Linux's decision after making entries old..avail_idx available (virtqueue_kick_prepare)."""
    if q.event_idx:
        return vring_need_event(mock.avail_event(), mock.avail_idx, old)
    return not mock.bus.read(mock.used, 2) & 1             # VIRTQ_USED_F_NO_NOTIFY


@pytest.mark.parametrize("event_idx", [False, True])
def test_polled_queue_asks_for_no_kicks(event_idx: bool) -> None:
    _, mock, q = make(event_idx=event_idx)
    q.publish_avail_event()
    old = mock.avail_idx
    mock.add([Buffer(RAM + 0x20000, 8, True)])
    assert driver_kicks(q, mock, old)                     # an ordinary queue wants the kick
    q.polled = True
    for batch in (1, 3, 8, 8, 5):                         # around the ring several times
        q.publish_avail_event()
        old = mock.avail_idx
        while (c := q.pop()) is not None:
            q.push(c.head, 8)
        mock.used_entries()
        for _ in range(batch):
            mock.add([Buffer(RAM + 0x20000, 8, True)])
        assert not driver_kicks(q, mock, old), batch
    assert q.pop() is not None                            # the entries are there all the same


@pytest.mark.parametrize("event_idx", [False, True])
def test_polled_queue_taken_mid_batch_asks_for_no_kick(event_idx: bool) -> None:
    """The device polls between CPU slices, so it can take entries of a batch the driver has
    not yet decided about (Linux's receive refill adds many, then decides once)."""
    _, mock, q = make(event_idx=event_idx)
    q.polled = True
    for _ in range(3):                                    # around the ring several times
        old = mock.avail_idx                              # the driver's last decision
        for _ in range(3):
            mock.add([Buffer(RAM + 0x20000, 8, True)])
        while (c := q.pop()) is not None:                 # a poll in the middle of the batch
            q.push(c.head, 8)
        q.publish_avail_event()
        mock.used_entries()
        for _ in range(2):
            mock.add([Buffer(RAM + 0x20000, 8, True)])
        assert not driver_kicks(q, mock, old)
        while (c := q.pop()) is not None:
            q.push(c.head, 8)
        mock.used_entries()


def test_event_idx() -> None:
    _, mock, q = make(event_idx=True)
    for _ in range(3):
        mock.add([Buffer(RAM + 0x20000, 8, True)])
    q.publish_avail_event()
    while (c := q.pop()) is not None:
        q.push(c.head, 8)
    q.publish_avail_event()
    assert mock.avail_event() == 3                # kick me when entry 3 is made available
    mock.set_used_event(5)                        # the driver wants to hear at used idx 6
    assert not q.should_notify()
    for _ in range(3):
        mock.add([Buffer(RAM + 0x20000, 8, True)])
        q.push(q.pop().head, 8)  # type: ignore[union-attr]
    assert q.should_notify()                      # used went 3 -> 6, past 5
    assert vring_need_event(0, 1, 0) and not vring_need_event(5, 3, 0)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)    # across the wrap


def _hostile(mock: MockQueue, bus: GuardedBus, case: str) -> None:
    table = RAM + 0x30000
    if case == "head out of range":
        mock.publish(200)
    elif case == "buffer below RAM":
        mock.write_desc(0, RAM - 0x1000, 16, 0, 0)
        mock.publish(0)
    elif case == "buffer straddles end of RAM":
        mock.write_desc(0, END - 8, 16, F_WRITE, 0)
        mock.publish(0)
    elif case == "huge length":
        mock.write_desc(0, RAM, 0xFFFF_FFFF, F_WRITE, 0)
        mock.publish(0)
    elif case == "address wraps 64 bits":
        mock.write_desc(0, (1 << 64) - 8, 16, 0, 0)
        mock.publish(0)
    elif case == "loop":
        mock.write_desc(0, RAM + 0x20000, 16, F_NEXT, 1)
        mock.write_desc(1, RAM + 0x20000, 16, F_NEXT, 0)
        mock.publish(0)
    elif case == "self loop":
        mock.write_desc(3, RAM + 0x20000, 16, F_NEXT, 3)
        mock.publish(3)
    elif case == "next out of range":
        mock.write_desc(0, RAM + 0x20000, 16, F_NEXT, 9)
        mock.publish(0)
    elif case == "readable after writable":
        mock.write_desc(0, RAM + 0x20000, 16, F_WRITE | F_NEXT, 1)
        mock.write_desc(1, RAM + 0x20000, 16, 0, 0)
        mock.publish(0)
    elif case == "indirect with next":
        bus.write_bytes(table, struct.pack("<QIHH", RAM + 0x20000, 16, 0, 0))
        mock.write_desc(0, table, 16, F_INDIRECT | F_NEXT, 1)
        mock.publish(0)
    elif case == "indirect length not a multiple of 16":
        mock.write_desc(0, table, 24, F_INDIRECT, 0)
        mock.publish(0)
    elif case == "indirect length 0":
        mock.write_desc(0, table, 0, F_INDIRECT, 0)
        mock.publish(0)
    elif case == "indirect table outside RAM":
        mock.write_desc(0, END - 16, 32, F_INDIRECT, 0)
        mock.publish(0)
    elif case == "indirect in indirect":
        bus.write_bytes(table, struct.pack("<QIHH", table, 16, F_INDIRECT, 0))
        mock.write_desc(0, table, 16, F_INDIRECT, 0)
        mock.publish(0)
    elif case == "indirect loop":
        bus.write_bytes(table, struct.pack("<QIHH", RAM + 0x20000, 8, F_NEXT, 1)
                        + struct.pack("<QIHH", RAM + 0x20000, 8, F_NEXT, 0))
        mock.write_desc(0, table, 32, F_INDIRECT, 0)
        mock.publish(0)
    elif case == "indirect table longer than the queue":
        entries = b"".join(struct.pack("<QIHH", RAM + 0x20000, 8, F_NEXT, i + 1) for i in range(15))
        bus.write_bytes(table, entries + struct.pack("<QIHH", RAM + 0x20000, 8, 0, 0))
        mock.write_desc(0, table, 16 * 16, F_INDIRECT, 0)
        mock.publish(0)
    elif case == "avail index far ahead":
        mock.set_avail_idx(9)
    elif case == "avail index behind":
        mock.set_avail_idx(0xFFF0)
    else:
        raise AssertionError(case)


HOSTILE = ["head out of range", "buffer below RAM", "buffer straddles end of RAM", "huge length",
           "address wraps 64 bits", "loop", "self loop", "next out of range", "readable after writable",
           "indirect with next", "indirect length not a multiple of 16", "indirect length 0",
           "indirect table outside RAM", "indirect in indirect", "indirect loop",
           "indirect table longer than the queue", "avail index far ahead", "avail index behind"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_rings_break_the_queue(case: str) -> None:
    bus, mock, q = make(size=8)
    _hostile(mock, bus, case)
    with pytest.raises(QueueError):
        q.pop()
    assert q.broken
    with pytest.raises(QueueError):               # and it stays broken
        q.pop()
    q.push(0, 1)                                  # a late completion is dropped, not written
    assert mock.used_idx() == 0
    assert bus.stray == []                        # nothing outside RAM was touched


@pytest.mark.parametrize("field,value", [("desc", RAM + 8), ("avail", RAM + 1), ("used", RAM + 2),
                                         ("desc", END - 16), ("used", 0x1000), ("size", 6)])
def test_bad_layout(field: str, value: int) -> None:
    bus, _, q = make(size=8)
    q.disable()
    setattr(q, field, value)
    q.enable(False)
    assert q.broken
    with pytest.raises(QueueError):
        q.pop()
    assert bus.stray == []


def test_split_spans() -> None:
    spans = [(100, 10), (200, 5), (300, 1)]
    assert split_spans(spans, 12) == ([(100, 10), (200, 2)], [(202, 3), (300, 1)])
    assert split_spans(spans, 0) == ([], spans)
    assert split_spans(spans, 99) == (spans, [])


def test_scatter_gather() -> None:
    bus, _, q = make()
    spans = [(RAM + 0x20000, 3), (RAM + 0x21000, 4)]
    assert q.scatter(spans, b"abcdefghij") == 7
    assert q.gather(spans, 100) == b"abcdefg" and q.gather(spans, 5) == b"abcde"


# -- property tests: garbage rings -------------------------------------------------------------
ADDRS = st.one_of(st.integers(RAM, END - 1), st.integers(END - 64, END + 64),
                  st.integers(RAM - 64, RAM + 64), st.integers(0, (1 << 64) - 1))
LENGTHS = st.one_of(st.integers(0, 64), st.integers(0, 0x20000), st.integers(0, 0xFFFF_FFFF))
GARBAGE = st.tuples(ADDRS, LENGTHS, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
INDIRECT_TABLE = RAM + 0x40000


def sane(size: int) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """Descriptors that are mostly right: RAM buffers, plausible flags and links."""
    return st.tuples(st.integers(RAM + 0x20000, RAM + 0x30000), st.integers(0, 4096),
                     st.sampled_from([0, F_NEXT, F_WRITE, F_WRITE | F_NEXT, F_INDIRECT]),
                     st.integers(0, size))


@pytest.mark.timeout(120)                         # "never loop": a hang fails, not stalls
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.sampled_from([1, 2, 4, 8, 16]), last=st.integers(0, 0xFFFF))
def test_garbage_rings_never_escape(data, size, last) -> None:
    bus, mock, q = make(size=size)
    ahead = data.draw(st.one_of(st.integers(0, size), st.integers(0, size), st.integers(0, 0xFFFF)))
    for i in range(size):
        addr, length, flags, nxt = data.draw(st.one_of(sane(size), sane(size), GARBAGE))
        if flags & F_INDIRECT and data.draw(st.booleans()):
            addr, length = INDIRECT_TABLE, 16 * data.draw(st.integers(0, 21))
        mock.write_desc(i, addr, length, flags, nxt)
    for i in range(21):
        addr, length, flags, nxt = data.draw(st.one_of(sane(21), GARBAGE))
        bus.write_bytes(INDIRECT_TABLE + 16 * i, struct.pack("<QIHH", addr & (2**64 - 1), length,
                                                             flags & 0xFFFF, nxt & 0xFFFF))
    for i in range(size):
        bus.write(mock.avail + 4 + 2 * i, 2, data.draw(st.integers(0, size + 1)))
    q.last_avail = last
    mock.set_avail_idx(last + ahead)
    popped = 0
    while True:
        try:
            c = q.pop()
        except QueueError as e:
            assert q.broken
            event(f"broken: {str(e).split(' ')[0]}")
            break
        if c is None:
            break
        event("popped a chain")
        popped += 1
        assert popped <= size                     # never more than the driver made available
        assert c.head < size
        assert len(c.readable) + len(c.writable) <= size
        for a, n in c.readable + c.writable:
            assert bus.is_ram(a, n)
        q.push(c.head, c.writable_len)
    q.should_notify()
    assert bus.stray == []


def test_push_many_puts_chains_on_the_used_ring_in_order_round_the_ring() -> None:
    _, mock, q = make()
    for rounds in range(3 * q.size // 5):                 # the used index wraps the ring
        heads = []
        for n in range(5):
            mock.add([Buffer(RAM + 0x20000, 8, True)])
            c = q.pop()
            assert c is not None
            heads.append((c.head, n + rounds))
        before = mock.used_idx()
        q.push_many(heads)
        assert mock.used_idx() == (before + 5) & 0xFFFF
        assert mock.used_entries() == heads
    q.push_many([])                                       # nothing: the index stays
    assert mock.used_entries() == []
