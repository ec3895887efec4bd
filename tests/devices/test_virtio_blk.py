"""virtio-blk through the mock driver: requests, errors, hostile queues."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirt.backends.block import RawFileBackend
from pyvirt.devices.virtio.blk import (
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlk,
)
from pyvirt.devices.virtio.device import STATUS_DEVICE_NEEDS_RESET, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from pyvirt.testing.fakes import MemoryBlockBackend
from pyvirt.testing.virtio_rig import RAM, Rig, make_rig
from pyvirt.testing.virtq import F_INDIRECT, F_NEXT, F_WRITE, Buffer, MockQueue

DISK = 1 << 20
PATTERN = bytes(range(256)) * (DISK // 256)


def rig_for(backend, serial: str = "serial-123", **init) -> tuple[Rig, MockQueue]:
    rig = make_rig(VirtioBlk(backend, serial=serial))
    (q,) = rig.drv.init(**init)
    return rig, q


@pytest.fixture
def mem() -> MemoryBlockBackend:
    return MemoryBlockBackend(data=PATTERN)


def header(rig: Rig, kind: int, sector: int) -> Buffer:
    return rig.drv.buffer(struct.pack("<IIQ", kind, 0, sector))


def submit(rig: Rig, q: MockQueue, bufs: list[Buffer], indirect: bool = False) -> int:
    """Post one chain, kick, return the used length (exactly one completion expected)."""
    head = q.add(bufs, indirect=indirect)
    rig.drv.kick()
    used = q.used_entries()
    assert [h for h, _ in used] == [head]
    return used[0][1]


def request(rig: Rig, q: MockQueue, kind: int, sector: int, *, read: int = 0,
            write: bytes | None = None) -> tuple[int, int, Buffer | None]:
    """(status, used length, data-in buffer)."""
    bufs = [header(rig, kind, sector)]
    data = None
    if write is not None:
        bufs.append(rig.drv.buffer(write))
    elif read:
        data = rig.drv.buffer(read, writable=True)
        bufs.append(data)
    status = rig.drv.buffer(b"\xff", writable=True)
    n = submit(rig, q, bufs + [status])
    return rig.drv.read(status)[0], n, data


def test_features_and_config(mem) -> None:
    rig, _ = rig_for(mem)
    f = rig.drv.device_features()
    assert f & VIRTIO_BLK_F_SEG_MAX and f & VIRTIO_BLK_F_BLK_SIZE and f & VIRTIO_BLK_F_FLUSH
    assert not f & VIRTIO_BLK_F_RO
    assert rig.drv.config_read(0, 8) == DISK // 512
    assert rig.drv.config_read(0, 4) | rig.drv.config_read(4, 4) << 32 == DISK // 512
    assert rig.drv.config_read(12, 4) == 1022 and rig.drv.config_read(20, 4) == 512
    assert rig.drv.config_read(0x400, 4) == 0


def test_read(mem) -> None:
    rig, q = rig_for(mem)
    status, n, data = request(rig, q, VIRTIO_BLK_T_IN, 3, read=2048)
    assert (status, n) == (VIRTIO_BLK_S_OK, 2049)
    assert data is not None and rig.drv.read(data) == PATTERN[3 * 512:3 * 512 + 2048]
    assert rig.irq.level and rig.drv.ack_interrupt() == 1
    assert rig.device.stats["reads"] == 1


def test_read_scatters_over_many_buffers(mem) -> None:
    rig, q = rig_for(mem)
    parts = [rig.drv.buffer(n, writable=True) for n in (100, 412, 1, 511)]
    status = rig.drv.buffer(1, writable=True)
    n = submit(rig, q, [header(rig, VIRTIO_BLK_T_IN, 1)] + parts + [status])
    assert n == 1025 and rig.drv.read(status) == b"\0"
    assert b"".join(rig.drv.read(p) for p in parts) == PATTERN[512:1536]


def test_header_and_status_split_oddly(mem) -> None:
    """2.7.4: no assumptions about how the request is laid over descriptors."""
    rig, q = rig_for(mem)
    hdr = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 2)
    data_and_status = rig.drv.buffer(513, writable=True)
    n = submit(rig, q, [rig.drv.buffer(hdr[:3]), rig.drv.buffer(hdr[3:]), data_and_status])
    got = rig.drv.read(data_and_status)
    assert n == 513 and got[:512] == PATTERN[1024:1536] and got[512] == VIRTIO_BLK_S_OK


def test_write_and_flush(mem) -> None:
    rig, q = rig_for(mem)
    payload = b"\xab" * 512 + b"\xcd" * 512
    status, n, _ = request(rig, q, VIRTIO_BLK_T_OUT, 10, write=payload)
    assert (status, n) == (VIRTIO_BLK_S_OK, 1)
    assert mem.data[10 * 512:12 * 512] == payload and mem.unflushed
    status, _, _ = request(rig, q, VIRTIO_BLK_T_FLUSH, 0)
    assert status == VIRTIO_BLK_S_OK and mem.flushes == 1 and not mem.unflushed


def test_get_id(mem) -> None:
    rig, q = rig_for(mem)
    status, n, data = request(rig, q, VIRTIO_BLK_T_GET_ID, 0, read=20)
    assert (status, n) == (VIRTIO_BLK_S_OK, 21)
    assert data is not None and rig.drv.read(data) == b"serial-123".ljust(20, b"\0")
    status, n, data = request(rig, q, VIRTIO_BLK_T_GET_ID, 0, read=4)   # short buffer: what fits
    assert (status, n) == (VIRTIO_BLK_S_OK, 5) and rig.drv.read(data) == b"seri"  # type: ignore[arg-type]


def test_long_serial_is_cut_to_20_bytes(mem) -> None:
    rig, q = rig_for(mem, serial="x" * 40)
    _, _, data = request(rig, q, VIRTIO_BLK_T_GET_ID, 0, read=20)
    assert rig.drv.read(data) == b"x" * 20  # type: ignore[arg-type]


def test_read_only_disk() -> None:
    mem = MemoryBlockBackend(data=PATTERN, read_only=True)
    rig, q = rig_for(mem)
    assert rig.drv.device_features() & VIRTIO_BLK_F_RO
    status, n, _ = request(rig, q, VIRTIO_BLK_T_OUT, 0, write=b"x" * 512)
    assert (status, n) == (VIRTIO_BLK_S_IOERR, 1)
    assert bytes(mem.data) == PATTERN and mem.writes == 0
    assert request(rig, q, VIRTIO_BLK_T_IN, 0, read=512)[0] == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("sector,length", [(DISK // 512, 512), (DISK // 512 - 1, 1024),
                                           (1 << 63, 512), ((1 << 64) - 1, 512), (0, 100)])
def test_out_of_range_and_odd_lengths(mem, sector: int, length: int) -> None:
    rig, q = rig_for(mem)
    status, n, data = request(rig, q, VIRTIO_BLK_T_IN, sector, read=length)
    assert (status, n) == (VIRTIO_BLK_S_IOERR, 1)
    assert rig.drv.read(data) == bytes(length)  # type: ignore[arg-type]
    status, _, _ = request(rig, q, VIRTIO_BLK_T_OUT, sector, write=b"z" * length)
    assert status == VIRTIO_BLK_S_IOERR and bytes(mem.data) == PATTERN
    assert rig.drv.status & STATUS_DEVICE_NEEDS_RESET == 0


@pytest.mark.parametrize("kind", [2, 3, 10, 12, 14, 99, 0xFFFF_FFFF])
def test_unsupported_types(mem, kind: int) -> None:
    rig, q = rig_for(mem)
    assert request(rig, q, kind, 0, read=512)[0] == VIRTIO_BLK_S_UNSUPP


def test_backend_errors_become_ioerr(mem) -> None:
    rig, q = rig_for(mem)
    mem.fail_reads = mem.fail_writes = mem.fail_flush = True
    assert request(rig, q, VIRTIO_BLK_T_IN, 0, read=512)[0] == VIRTIO_BLK_S_IOERR
    assert request(rig, q, VIRTIO_BLK_T_OUT, 0, write=b"q" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert request(rig, q, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_IOERR
    mem.fail_reads = False
    assert request(rig, q, VIRTIO_BLK_T_IN, 0, read=512)[0] == VIRTIO_BLK_S_OK
    assert rig.device.stats["errors"] == 3


def test_malformed_requests_complete_without_crashing(mem) -> None:
    rig, q = rig_for(mem)
    # No device-writable byte at all: nowhere for a status, completed with 0 bytes.
    assert submit(rig, q, [header(rig, VIRTIO_BLK_T_IN, 0), rig.drv.buffer(512)]) == 0
    # Header shorter than 16 bytes: IOERR in the status byte.
    status = rig.drv.buffer(1, writable=True)
    assert submit(rig, q, [rig.drv.buffer(b"\0" * 8), status]) == 1
    assert rig.drv.read(status)[0] == VIRTIO_BLK_S_IOERR
    # Only writable descriptors (the header in the wrong direction).
    status = rig.drv.buffer(17, writable=True)
    assert submit(rig, q, [status]) == 1 and rig.drv.read(status)[16] == VIRTIO_BLK_S_IOERR
    # A read with no data buffer is an empty read.
    assert request(rig, q, VIRTIO_BLK_T_IN, 0)[0:2] == (VIRTIO_BLK_S_OK, 1)
    # Zero-length descriptors are skipped when looking for the status byte.
    status = rig.drv.buffer(1, writable=True)
    n = submit(rig, q, [header(rig, VIRTIO_BLK_T_FLUSH, 0), status, Buffer(RAM, 0, True)])
    assert n == 1 and rig.drv.read(status)[0] == VIRTIO_BLK_S_OK
    assert not rig.drv.status & STATUS_DEVICE_NEEDS_RESET
    assert rig.bus.stray == []


def test_indirect_request(mem) -> None:
    rig, q = rig_for(mem)
    data, status = rig.drv.buffer(1024, writable=True), rig.drv.buffer(1, writable=True)
    n = submit(rig, q, [header(rig, VIRTIO_BLK_T_IN, 4), data, status], indirect=True)
    assert n == 1025 and rig.drv.read(data) == PATTERN[2048:3072]


def test_batch_and_event_idx_suppression(mem) -> None:
    rig, q = rig_for(mem)
    assert rig.device.negotiated(VIRTIO_F_EVENT_IDX)
    statuses = []
    for i in range(5):
        statuses.append(rig.drv.buffer(1, writable=True))
        q.add([header(rig, VIRTIO_BLK_T_IN, i), rig.drv.buffer(512, writable=True), statuses[-1]])
    rig.drv.kick()
    assert len(q.used_entries()) == 5 and all(rig.drv.read(s) == b"\0" for s in statuses)
    assert rig.drv.ack_interrupt() == 1
    assert q.avail_event() == 5                   # kick me when the 6th request comes
    q.set_used_event(0xFFFF)                      # "don't interrupt me for a while"
    request_bufs = [header(rig, VIRTIO_BLK_T_FLUSH, 0), rig.drv.buffer(1, writable=True)]
    q.add(request_bufs)
    rig.drv.kick()
    assert rig.bus.read(q.used + 2, 2) == 6 and not rig.irq.level


def test_without_event_idx(mem) -> None:
    rig, q = rig_for(mem, accept=VIRTIO_F_VERSION_1)
    assert request(rig, q, VIRTIO_BLK_T_IN, 0, read=512)[0] == VIRTIO_BLK_S_OK
    assert rig.drv.ack_interrupt() == 1
    q.set_avail_flags(1)                          # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert request(rig, q, VIRTIO_BLK_T_IN, 0, read=512)[0] == VIRTIO_BLK_S_OK
    assert not rig.irq.level


def test_reads_tell_the_bus_what_they_wrote(mem) -> None:
    """Guest code in a page the device fills must be re-translated: dma_written fires."""
    rig, q = rig_for(mem)
    data = rig.drv.buffer(512, writable=True)
    seen: list[tuple[int, int]] = []
    rig.bus.watch(data.addr >> 12, lambda a, n: seen.append((a, n)))
    bufs = [header(rig, VIRTIO_BLK_T_IN, 0), data, rig.drv.buffer(1, writable=True)]
    submit(rig, q, bufs)
    assert (data.addr, 512) in seen


# -- hostile queues ---------------------------------------------------------------------------
def test_descriptor_outside_ram_needs_reset_and_vmm_survives(mem) -> None:
    rig, q = rig_for(mem)
    q.add([header(rig, VIRTIO_BLK_T_IN, 0), Buffer(0x1000, 512, True), rig.drv.buffer(1, True)])
    rig.drv.kick()
    assert rig.drv.status & STATUS_DEVICE_NEEDS_RESET
    assert rig.irq.level and rig.drv.ack_interrupt() == 2   # configuration-change notification
    assert q.used_entries() == []
    rig.drv.kick()                                # further kicks do nothing, raise nothing
    assert rig.bus.stray == []
    (q,) = rig.drv.init()                         # the driver resets and carries on
    assert request(rig, q, VIRTIO_BLK_T_IN, 0, read=512)[0] == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("case", ["loop", "huge length", "indirect loop", "avail jump", "bad head"])
def test_hostile_queues(mem, case: str) -> None:
    rig, q = rig_for(mem)
    hdr = header(rig, VIRTIO_BLK_T_IN, 0)
    if case == "loop":
        q.write_desc(0, hdr.addr, 16, F_NEXT, 1)
        q.write_desc(1, hdr.addr, 16, F_NEXT | F_WRITE, 0)
        q.publish(0)
    elif case == "huge length":
        q.write_desc(0, hdr.addr, 0xFFFF_FFFF, F_WRITE, 0)
        q.publish(0)
    elif case == "indirect loop":
        table = rig.drv.alloc(32)
        rig.bus.write_bytes(table, struct.pack("<QIHH", hdr.addr, 16, F_NEXT, 1)
                            + struct.pack("<QIHH", hdr.addr, 16, F_NEXT, 0))
        q.write_desc(0, table, 32, F_INDIRECT, 0)
        q.publish(0)
    elif case == "avail jump":
        q.set_avail_idx(5000)
    elif case == "bad head":
        q.publish(0xFFFF)
    rig.drv.kick()
    assert rig.drv.status & STATUS_DEVICE_NEEDS_RESET
    assert "internal error" not in rig.device.needs_reset_reason
    assert bytes(mem.data) == PATTERN and rig.bus.stray == []


@pytest.mark.timeout(120)                         # "never loop": a hang fails, not stalls
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_requests_never_escape(data) -> None:
    """Random (often nonsensical) chains and headers: never an exception, never a stray access."""
    mem = MemoryBlockBackend(data=PATTERN)
    rig, q = rig_for(mem, queue_size=8)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from([0, 1, 4, 8, 2, 99, 11, 13]))     # (11, 13: DISCARD, WRITE_ZEROES)
        sector = data.draw(st.one_of(st.integers(0, DISK // 512 + 2), st.integers(0, (1 << 64) - 1)))
        hdr = struct.pack("<IIQ", kind, 0, sector)[:data.draw(st.integers(0, 16))]
        bufs = [rig.drv.buffer(hdr)] if hdr or data.draw(st.booleans()) else []
        for _ in range(data.draw(st.integers(0, 3))):
            bufs.append(rig.drv.buffer(data.draw(st.integers(0, 1100)), writable=data.draw(st.booleans())))
        if not bufs or len(bufs) > len(q.free):
            continue
        q.add(bufs, indirect=data.draw(st.booleans()))
    if data.draw(st.booleans()):                  # sometimes scribble over the ring as well
        q.write_desc(data.draw(st.integers(0, 7)), data.draw(st.integers(0, (1 << 64) - 1)),
                     data.draw(st.integers(0, 0xFFFF_FFFF)), data.draw(st.integers(0, 7)),
                     data.draw(st.integers(0, 9)))
    rig.drv.kick()
    used = q.used_entries()
    assert all(h < 8 for h, _ in used)
    assert "internal error" not in rig.device.needs_reset_reason
    assert rig.bus.stray == []


# -- with a real image file -----------------------------------------------------------------------
def test_raw_file_round_trip(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(PATTERN)
    backend = RawFileBackend(img)
    rig, q = rig_for(backend)
    status, _, data = request(rig, q, VIRTIO_BLK_T_IN, 7, read=4096)
    assert status == VIRTIO_BLK_S_OK and rig.drv.read(data) == PATTERN[7 * 512:7 * 512 + 4096]  # type: ignore[arg-type]
    assert request(rig, q, VIRTIO_BLK_T_OUT, 1, write=b"\x77" * 1024)[0] == VIRTIO_BLK_S_OK
    assert request(rig, q, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    backend.close()
    assert img.read_bytes()[512:1536] == b"\x77" * 1024
    assert img.read_bytes()[1536:] == PATTERN[1536:]


def test_save_load(mem) -> None:
    rig, q = rig_for(mem)
    request(rig, q, VIRTIO_BLK_T_IN, 0, read=512)
    state = rig.mmio.save()
    other = make_rig(VirtioBlk(mem, serial="serial-123"))
    other.bus.write_bytes(RAM, rig.bus.read_bytes(RAM, rig.bus.ram_size))
    other.mmio.load(state)
    q.bus = other.bus
    other.drv.mem = rig.drv.mem                   # the guest's own allocations carry on
    status, n, _ = request(other, q, VIRTIO_BLK_T_IN, 1, read=512)
    assert (status, n) == (VIRTIO_BLK_S_OK, 513)
    with pytest.raises(ValueError):
        make_rig(VirtioBlk(MemoryBlockBackend(size=4096))).mmio.load(state)


def _segments(*segs: tuple[int, int, int]) -> bytes:
    return b"".join(struct.pack("<QII", *seg) for seg in segs)


def test_discard_and_write_zeroes(mem) -> None:
    rig, q = rig_for(mem)
    f = rig.drv.device_features()
    assert f & VIRTIO_BLK_F_DISCARD and f & VIRTIO_BLK_F_WRITE_ZEROES
    assert rig.drv.config_read(36, 4) == 1 << 22 and rig.drv.config_read(40, 4) == 32     # max sectors, segs
    assert rig.drv.config_read(48, 4) == 1 << 22 and rig.drv.config_read(56, 1) == 1
    status, n, _ = request(rig, q, VIRTIO_BLK_T_DISCARD, 0, write=_segments((2, 3, 0), (10, 1, 0)))
    assert (status, n) == (VIRTIO_BLK_S_OK, 1)
    assert mem.discards == [(1024, 1536), (5120, 512)]
    assert bytes(mem.data[1024:2560]) == bytes(1536) and bytes(mem.data[2560:5120]) == PATTERN[2560:5120]
    status, _, _ = request(rig, q, VIRTIO_BLK_T_WRITE_ZEROES, 0, write=_segments((20, 4, 1)))
    assert status == VIRTIO_BLK_S_OK and bytes(mem.data[20 * 512:24 * 512]) == bytes(2048)
    assert bytes(mem.data[24 * 512:]) == PATTERN[24 * 512:]
    assert rig.device.stats["discards"] == 1 and rig.device.stats["zeroed"] == 1


@pytest.mark.parametrize("kind, segs, want", [
    (VIRTIO_BLK_T_DISCARD, [(0, 1, 1)], VIRTIO_BLK_S_UNSUPP),       # unmap flag on a discard
    (VIRTIO_BLK_T_WRITE_ZEROES, [(0, 1, 2)], VIRTIO_BLK_S_UNSUPP),  # reserved flag
    (VIRTIO_BLK_T_DISCARD, [(DISK // 512, 1, 0)], VIRTIO_BLK_S_IOERR),   # past the end
    (VIRTIO_BLK_T_WRITE_ZEROES, [(0, 1, 0), (2**63, 2, 0)], VIRTIO_BLK_S_IOERR),
    (VIRTIO_BLK_T_DISCARD, [(0, 1, 0)] * 33, VIRTIO_BLK_S_UNSUPP),   # too many segments
])
def test_bad_discards_change_nothing(mem, kind: int, segs: list[tuple[int, int, int]], want: int) -> None:
    rig, q = rig_for(mem)
    assert request(rig, q, kind, 0, write=_segments(*segs))[0] == want
    assert bytes(mem.data) == PATTERN and mem.discards == []
    status, _, _ = request(rig, q, kind, 0, write=b"\0" * 15)           # not whole segments
    assert status == VIRTIO_BLK_S_UNSUPP and bytes(mem.data) == PATTERN


def test_read_only_disk_offers_no_discard() -> None:
    rig, q = rig_for(MemoryBlockBackend(data=PATTERN, read_only=True))
    assert not rig.drv.device_features() & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)
    assert request(rig, q, VIRTIO_BLK_T_WRITE_ZEROES, 0, write=_segments((0, 1, 0)))[0] == VIRTIO_BLK_S_IOERR


def test_qcow2_round_trip_and_corruption_is_an_io_error(tmp_path: Path) -> None:
    """A qcow2 backend behind the device: requests work; metadata found corrupt fails the
    request with IOERR and the device carries on (the VM is not stopped)."""
    from pyvirt.backends.qcow2 import COPIED, Qcow2Backend
    from pyvirt.backends.qcow2_tools import create_qcow2

    img = tmp_path / "disk.qcow2"
    create_qcow2(img, DISK, cluster_size=4096)
    backend = Qcow2Backend(img)
    rig, q = rig_for(backend)
    assert request(rig, q, VIRTIO_BLK_T_OUT, 7, write=PATTERN[:4096])[0] == VIRTIO_BLK_S_OK
    assert request(rig, q, VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    status, _, data = request(rig, q, VIRTIO_BLK_T_IN, 6, read=5120)
    assert status == VIRTIO_BLK_S_OK
    assert rig.drv.read(data) == bytes(512) + PATTERN[:4096] + bytes(512)  # type: ignore[arg-type]
    backend.close()
    # Point guest cluster 100's L2 entry past the end of the file.
    raw = bytearray(img.read_bytes())
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & ~COPIED
    struct.pack_into(">Q", raw, l2 + 8 * 100, COPIED | (1 << 40))
    img.write_bytes(raw)
    backend = Qcow2Backend(img)
    rig, q = rig_for(backend)
    assert request(rig, q, VIRTIO_BLK_T_IN, 100 * 8, read=512)[0] == VIRTIO_BLK_S_IOERR
    status, _, data = request(rig, q, VIRTIO_BLK_T_IN, 7, read=512)
    assert status == VIRTIO_BLK_S_OK and rig.drv.read(data) == PATTERN[:512]  # type: ignore[arg-type]
    assert request(rig, q, VIRTIO_BLK_T_OUT, 0, write=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    backend.close()


def test_qcow2_discard_and_write_zeroes(tmp_path: Path) -> None:
    """DISCARD and WRITE_ZEROES on a qcow2 overlay: the ranges read as zeros (the backing
    file no longer shows through), whole clusters take no space, qemu-img agrees."""
    from pyvirt.backends.qcow2 import Qcow2Backend
    from pyvirt.backends.qcow2_tools import check_qcow2, create_qcow2
    from pyvirt.testing import qemu_img

    base = tmp_path / "base.raw"
    base.write_bytes(PATTERN)
    img = tmp_path / "top.qcow2"
    create_qcow2(img, None, cluster_size=4096, backing=base, backing_format="raw")
    backend = Qcow2Backend(img)
    rig, q = rig_for(backend)
    assert request(rig, q, VIRTIO_BLK_T_OUT, 64, write=b"\x11" * 8192)[0] == VIRTIO_BLK_S_OK
    # Sectors 64..79 were written, 8..31 come from the backing file.
    assert request(rig, q, VIRTIO_BLK_T_DISCARD, 0, write=_segments((8, 24, 0)))[0] == VIRTIO_BLK_S_OK
    assert request(rig, q, VIRTIO_BLK_T_WRITE_ZEROES, 0,
                   write=_segments((65, 14, 1), (200, 3, 0)))[0] == VIRTIO_BLK_S_OK
    model = bytearray(PATTERN)
    model[64 * 512:80 * 512] = b"\x11" * 8192
    for sector, count in ((8, 24), (65, 14), (200, 3)):
        model[sector * 512:(sector + count) * 512] = bytes(count * 512)
    status, _, data = request(rig, q, VIRTIO_BLK_T_IN, 0, read=256 * 512)
    assert status == VIRTIO_BLK_S_OK and rig.drv.read(data) == model[:256 * 512]  # type: ignore[arg-type]
    assert check_qcow2(backend).leaks == 0
    backend.close()
    if qemu_img.QEMU_IMG is not None:
        assert qemu_img.check(img)["returncode"] == 0
        assert qemu_img.to_raw(img) == model



def test_a_request_of_seg_max_segments_is_served_whole(mem) -> None:
    """seg_max (1022) is what a chain of the queue's size (1024) holds besides the header and
    status: 1 MiB of scattered 4 KiB pages is one request, and one segment more is refused."""
    rig, q = rig_for(mem)
    seg_max = rig.drv.config_read(12, 4)
    assert seg_max == 1022
    data = [rig.drv.buffer(512, writable=True) for _ in range(seg_max)]
    status = rig.drv.buffer(1, writable=True)
    n = submit(rig, q, [header(rig, VIRTIO_BLK_T_IN, 0)] + data + [status], indirect=True)
    assert n == 512 * seg_max + 1 and rig.drv.read(status)[0] == VIRTIO_BLK_S_OK
    assert b"".join(rig.drv.read(d) for d in data) == PATTERN[:512 * seg_max]
    rig.drv.ack_interrupt()
    q.add([header(rig, VIRTIO_BLK_T_IN, 0)] + data + [rig.drv.buffer(512, writable=True), status],
          indirect=True)
    rig.drv.kick()
    assert rig.drv.status & STATUS_DEVICE_NEEDS_RESET and q.used_entries() == []
