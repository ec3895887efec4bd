"""qcow2 images that are broken, unsupported, missing a backing file, locked; crash safety."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from pyvirt.backends import qcow2
from pyvirt.backends.qcow2 import Qcow2Backend
from pyvirt.backends.qcow2_tools import check_qcow2, create_qcow2
from pyvirt.errors import ImageCorruptError, ImageError
from pyvirt.testing import qemu_img as q

needs_qemu = pytest.mark.skipif(q.QEMU_IMG is None or q.QEMU_IO is None,
                                reason="needs qemu-img and qemu-io (Debian: qemu-utils)")

KIB, MIB = 1 << 10, 1 << 20


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture
def img(tmp_path: Path) -> Path:
    """A 1 MiB image with 64 KiB clusters: header, refcount table at 0x10000, refcount
    block at 0x20000, L1 at 0x30000; one data cluster written."""
    p = tmp_path / "x.qcow2"
    create_qcow2(p, 1 * MIB)
    b = Qcow2Backend(p)
    b.write(0, b"data" * 128)
    b.close()
    return p


# -- headers that are wrong --------------------------------------------------------------------
Q, I = ">Q", ">I"
HEADER_DAMAGE = [
    ("magic", 0, b"QFI\xfa", "not a qcow2 image"),
    ("version 1", 4, struct.pack(I, 1), "version 1"),
    ("version 4", 4, struct.pack(I, 4), "version 4"),
    ("cluster_bits 8", 20, struct.pack(I, 8), "cluster_bits 8"),
    ("cluster_bits 22", 20, struct.pack(I, 22), "cluster_bits 22"),
    ("huge size", 24, struct.pack(Q, 1 << 62), "too small"),
    ("encrypted", 32, struct.pack(I, 1), "is encrypted"),
    ("L1 too small", 36, struct.pack(I, 0), "too small"),
    ("L1 huge", 36, struct.pack(I, 1 << 30), "L1 table of"),
    ("L1 misaligned", 40, struct.pack(Q, 0x30008), "not cluster-aligned"),
    ("L1 in header", 40, struct.pack(Q, 0), "overlaps the header"),
    ("L1 past end", 40, struct.pack(Q, 1 << 40), "beyond the end"),
    ("L1 on refcount table", 40, struct.pack(Q, 0x10000), "overlap"),
    ("refcount table in header", 48, struct.pack(Q, 0), "overlaps the header"),
    ("refcount table misaligned", 48, struct.pack(Q, 0x10200), "not cluster-aligned"),
    ("refcount table past end", 48, struct.pack(Q, 1 << 50), "beyond the end"),
    ("no refcount table", 56, struct.pack(I, 0), "no clusters"),
    ("huge refcount table", 56, struct.pack(I, 1 << 31), "refcount table of"),
    ("many snapshots", 60, struct.pack(I, 1 << 20), "snapshots"),
    ("snapshot table outside", 60, struct.pack(I, 1) + struct.pack(Q, 1 << 45), "snapshot table"),
    ("external data file", 72, struct.pack(Q, 1 << 2), "external data file"),
    ("extended L2", 72, struct.pack(Q, 1 << 4), "extended L2"),
    ("compression bit alone", 72, struct.pack(Q, 1 << 3), "compression type"),
    ("unknown feature", 72, struct.pack(Q, 1 << 9), "unknown feature"),
    ("refcount_order 7", 96, struct.pack(I, 7), "refcount_order 7"),
    ("header_length short", 100, struct.pack(I, 100), "header_length"),
    ("header_length odd", 100, struct.pack(I, 108), "header_length"),
    ("header_length huge", 100, struct.pack(I, 1 << 20), "header_length"),
    ("extension overruns", 104, struct.pack(">II", 0x12345678, 1 << 20), "header extension"),
    ("backing name outside", 8, struct.pack(Q, 0xFFF0) + struct.pack(I, 100), "backing file name"),
    ("backing name too long", 8, struct.pack(Q, 200) + struct.pack(I, 5000), "backing file name"),
]


@pytest.mark.parametrize("what, offset, data, message", HEADER_DAMAGE, ids=[d[0] for d in HEADER_DAMAGE])
@pytest.mark.parametrize("read_only", [False, True])
def test_damaged_header_is_one_line_error(img: Path, what: str, offset: int, data: bytes, message: str,
                                          read_only: bool) -> None:
    patch(img, offset, data)
    before = img.read_bytes()
    with pytest.raises(ImageError) as e:
        Qcow2Backend(img, read_only=read_only)
    assert message in one_line(e)
    assert img.read_bytes() == before                        # nothing written


def test_truncated_files(tmp_path: Path, img: Path) -> None:
    data = img.read_bytes()
    for n in (0, 3, 71, 100, 0x10000 + 8, 0x30000):
        p = tmp_path / f"cut{n}.qcow2"
        p.write_bytes(data[:n])
        with pytest.raises(ImageError) as e:
            Qcow2Backend(p, read_only=True)
        one_line(e)


def test_failed_open_releases_the_lock(img: Path) -> None:
    patch(img, 56, struct.pack(">I", 0))
    for _ in range(3):
        with pytest.raises(ImageError, match="no clusters"):
            Qcow2Backend(img)            # an exclusive lock kept by a failed open would say "in use"
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ImageError):
        Qcow2Backend(img)
    assert len(os.listdir("/proc/self/fd")) == before


# -- images with features pyvirt does not do -----------------------------------------------------
@needs_qemu
@pytest.mark.parametrize("option, message", [("extended_l2=on", "extended L2 entries"),
                                             ("compression_type=zstd", "zstd compression")])
def test_unsupported_qemu_features(tmp_path: Path, option: str, message: str) -> None:
    p = q.create(tmp_path / "f.qcow2", 1 * MIB, options=(option,))
    with pytest.raises(ImageError) as e:
        Qcow2Backend(p, read_only=True)
    assert message in one_line(e) and "does not support" in str(e.value)


@pytest.mark.parametrize("bit, name", [(0, "dirty bit"), (1, "marked corrupt")])
def test_dirty_or_corrupt_images_open_read_only_only(img: Path, bit: int, name: str) -> None:
    patch(img, 72, struct.pack(">Q", 1 << bit))
    before = img.read_bytes()
    with pytest.raises(ImageError) as e:
        Qcow2Backend(img)
    assert name in one_line(e) and "read-only" in str(e.value)
    b = Qcow2Backend(img, read_only=True)
    buf = bytearray(512)
    b.readinto(0, memoryview(buf))
    assert buf == b"data" * 128
    b.close()
    assert img.read_bytes() == before


@needs_qemu
def test_snapshots_are_read_only(tmp_path: Path) -> None:
    p = q.create(tmp_path / "s.qcow2", 1 * MIB)
    q.qemu_img("snapshot", "-c", "one", p)
    with pytest.raises(ImageError, match="internal snapshots"):
        Qcow2Backend(p)


def test_unknown_autoclear_bits_are_cleared_before_the_first_write(img: Path) -> None:
    patch(img, 88, struct.pack(">Q", 0x8001))
    b = Qcow2Backend(img)
    assert img.read_bytes()[88:96] == struct.pack(">Q", 0x8001)     # opening changes nothing
    b.write(512, b"x" * 512)
    assert img.read_bytes()[88:96] == bytes(8)
    b.close()


# -- backing files ------------------------------------------------------------------------------
def test_missing_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MIB))
    top = tmp_path / "top.qcow2"
    create_qcow2(top, None, backing=base)
    base.unlink()
    with pytest.raises(ImageError) as e:
        Qcow2Backend(top)
    assert "base.raw does not exist" in one_line(e) and "backing file of" in str(e.value)


def test_backing_loop(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_qcow2(b, MIB)
    create_qcow2(a, MIB, backing=b, backing_format="qcow2")
    b.unlink()
    create_qcow2(b, MIB)
    with open(b, "r+b") as f:                                           # b -> a -> b
        f.seek(8)
        f.write(struct.pack(">QI", 512, len(b"a.qcow2")))
        f.seek(512)
        f.write(b"a.qcow2")
    for path, ro in ((a, True), (b, True), (a, False)):
        with pytest.raises(ImageError) as e:
            Qcow2Backend(path, read_only=ro)
        assert "loop" in one_line(e) or "in use" in str(e.value)


def test_backing_names_pyvirt_does_not_follow(img: Path, tmp_path: Path) -> None:
    data = bytearray(img.read_bytes())
    for name, fmt, message in ((b"nbd://host/export", None, "protocol syntax"),
                               (b"other.vmdk", b"vmdk", "format 'vmdk'")):
        (tmp_path / "other.vmdk").write_bytes(b"x" * 512)
        d = bytearray(data)
        ext = b""
        if fmt:
            ext = struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt.ljust(8, b"\0")
        d[104:104 + len(ext) + 8] = ext + bytes(8)
        struct.pack_into(">QI", d, 8, 512, len(name))
        d[512:512 + len(name)] = name
        p = tmp_path / "named.qcow2"
        p.write_bytes(bytes(d))
        with pytest.raises(ImageError) as e:
            Qcow2Backend(p, read_only=True)
        assert message in one_line(e)


# -- locks ----------------------------------------------------------------------------------------
def test_locking(img: Path, tmp_path: Path) -> None:
    first = Qcow2Backend(img)
    with pytest.raises(ImageError, match="in use by another VM"):
        Qcow2Backend(img)
    with pytest.raises(ImageError, match="in use by another VM"):
        Qcow2Backend(img, read_only=True)
    # An overlay cannot use, as its backing file, an image open for writing.
    top = tmp_path / "top.qcow2"
    first.close()
    create_qcow2(top, None, backing=img, backing_format="qcow2")
    writer = Qcow2Backend(img)
    with pytest.raises(ImageError, match="in use"):
        Qcow2Backend(top)
    writer.close()
    t1, t2 = Qcow2Backend(top, read_only=True), Qcow2Backend(top, read_only=True)
    with pytest.raises(ImageError, match="in use"):
        Qcow2Backend(img)                                # a backing file is locked shared
    t1.close()
    t2.close()
    Qcow2Backend(img).close()


# -- corruption found while running --------------------------------------------------------------
def l2_entry_offset(img: Path, gc: int) -> int:
    data = img.read_bytes()
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_offset)[0] & qcow2.OFFSET_MASK
    return l2 + 8 * gc


@pytest.mark.parametrize("entry, message", [
    (qcow2.COPIED | (1 << 40), "outside the file"),
    (qcow2.COPIED | 0x30000, "overlaps metadata"),               # the L1 table
    (qcow2.COPIED | 0x10100, "reserved bits"),
    (qcow2.COPIED | 0x10000 | (1 << 57), "reserved bits"),
    (qcow2.COMPRESSED | 0x100, "outside the file"),
])
def test_corrupt_l2_entry_fails_requests_not_the_vm(img: Path, entry: int, message: str) -> None:
    patch(img, l2_entry_offset(img, 3), struct.pack(">Q", entry))
    before = img.read_bytes()
    b = Qcow2Backend(img)
    buf = memoryview(bytearray(512))
    b.readinto(0, buf)                                      # the rest of the disk still reads
    assert bytes(buf) == b"data" * 128
    with pytest.raises(ImageCorruptError) as e:
        b.readinto(3 * 65536, buf)
        b.write(3 * 65536, b"x" * 512)                      # (writes in place check more)
    assert isinstance(e.value, OSError) and e.value.errno == 5
    assert message in one_line(e)
    with pytest.raises(ImageCorruptError):
        b.write(0, b"y" * 512)                              # no more writes after corruption
    b.close()
    assert img.read_bytes() == before


def test_compressed_cluster_that_does_not_inflate(img: Path) -> None:
    # A descriptor for 2 sectors at 0x40000 (the data cluster), which is not deflate data.
    cb = 16
    desc = qcow2.COMPRESSED | (1 << (62 - (cb - 8))) | 0x40000
    patch(img, l2_entry_offset(img, 2), struct.pack(">Q", desc))
    b = Qcow2Backend(img, read_only=True)
    with pytest.raises(ImageCorruptError, match="inflate"):
        b.readinto(2 * 65536, memoryview(bytearray(512)))
    b.close()


def test_l2_table_pointing_at_the_refcount_block(img: Path) -> None:
    patch(img, 0x30000, struct.pack(">Q", qcow2.COPIED | 0x20000))
    b = Qcow2Backend(img)
    with pytest.raises(ImageCorruptError, match="overlaps other metadata"):
        b.readinto(0, memoryview(bytearray(512)))
    b.close()


# -- crash safety -----------------------------------------------------------------------------
class Recorder:
    """Records every write the backend makes to its file, and every fdatasync."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[int, bytes] | None] = []      # None: a sync
        real_pwritev, real_sync = qcow2._pwritev, os.fdatasync

        def pwritev(fd: int, bufs, offset: int) -> int:
            data = b"".join(bytes(memoryview(x).cast("B")) for x in bufs)
            self.events.append((offset, data))
            return real_pwritev(fd, bufs, offset)

        def fdatasync(fd: int) -> None:
            self.events.append(None)
            real_sync(fd)

        monkeypatch.setattr(qcow2, "_pwritev", pwritev)
        monkeypatch.setattr(qcow2.os, "fdatasync", fdatasync)


def state_after(initial: bytes, writes: list[tuple[int, bytes]]) -> bytes:
    f = bytearray(initial)
    for off, data in writes:
        if off + len(data) > len(f):
            f += bytes(off + len(data) - len(f))
        f[off:off + len(data)] = data
    return bytes(f)


@needs_qemu
def test_crash_at_any_point_leaves_a_consistent_image(tmp_path: Path, monkeypatch) -> None:
    """Replay the backend's writes up to every point (a process crash), and with random
    subsets of the writes since the last fdatasync (a power cut: the disk may keep any of
    them): qemu-img check may find leaks, never corruption; right after a flush the
    image holds exactly what was written."""
    # 512-byte clusters and 64-bit refcounts: a refcount block counts 64 clusters and the
    # first refcount table 2 MiB of file, so new refcount blocks and a moved table happen.
    img = q.create(tmp_path / "c.qcow2", 8 * MIB, cluster_size=512, options=("refcount_bits=64",))
    b = Qcow2Backend(img)
    b.write(0, b"\x01" * 3000)
    b.close()
    initial = img.read_bytes()
    rec = Recorder(monkeypatch)
    b = Qcow2Backend(img)
    flushed: list[tuple[int, bytes]] = []       # (guest offset, data) made durable by a flush
    rng = random.Random(1)
    ops: list[tuple[int, bytes]] = []
    marks: list[tuple[int, list[tuple[int, bytes]]]] = []     # after a flush: events so far, data
    for i in range(6):
        for _ in range(5):
            off = rng.randrange(0, 8 * MIB - 40 * KIB) // 512 * 512
            data = bytes([i + 2]) * rng.choice((512, 1536, 4096, 40 * KIB, 300 * KIB))
            b.write(off, data)
            ops.append((off, data))
        big = (4 * MIB + i * 400 * KIB, bytes([i + 40]) * (400 * KIB))       # new clusters
        b.write(*big)
        ops.append(big)
        if i == 2:
            b.discard(0, 2048)
            ops.append((0, bytes(2048)))
        b.write(3 * MIB + 7, b"rewrite" * 10)                       # in place
        ops.append((3 * MIB + 7, b"rewrite" * 10))
        b.flush()
        flushed = list(ops)
        marks.append((len(rec.events), flushed))
    b.close()
    assert struct.unpack(">I", img.read_bytes()[56:60])[0] > 1        # the refcount table moved
    events = rec.events
    assert sum(e is None for e in events) >= 6

    def check_state(data: bytes, durable: list[tuple[int, bytes]] | None) -> None:
        p = tmp_path / "crashed.qcow2"
        p.write_bytes(data)
        chk = q.check(p)
        assert chk["returncode"] in (0, 3), chk                # clean, or leaks only
        assert not chk.get("corruptions"), chk
        if durable is not None:
            model = bytearray(8 * MIB)
            model[:3000] = b"\x01" * 3000
            for off, d in durable:
                model[off:off + len(d)] = d
            assert q.to_raw(p) == model
        p.unlink()

    writes = [e for e in events if e is not None]
    # Process crashes: every 7th write boundary, and right after each flush.
    done = 0
    points = set(range(0, len(events), 7)) | {m for m, _ in marks}
    for k in sorted(points):
        prefix = [e for e in events[:k] if e is not None]
        durable = next((d for m, d in marks if m == k), None)     # right after a flush: all of it
        check_state(state_after(initial, prefix), durable)
        done += 1
    assert done > 10 and writes
    # Power cuts: the writes before a sync all landed, any subset of the next batch did.
    syncs = [i for i, e in enumerate(events) if e is None]
    for s_prev, s_next in zip(syncs, syncs[1:]):
        batch = [e for e in events[s_prev + 1:s_next] if e is not None]
        if not batch:
            continue
        base = [e for e in events[:s_prev] if e is not None]
        for _ in range(2):
            subset = [w for w in batch if rng.random() < 0.5]
            check_state(state_after(initial, base + subset), None)


def test_check_reports_leaks_and_errors(img: Path) -> None:
    # A refcount for a cluster nothing uses: a leak.  A refcount of 0 for the data cluster: an error.
    patch(img, 0x20000 + 2 * 10, struct.pack(">H", 1))
    b = Qcow2Backend(img, read_only=True)
    r = check_qcow2(b)
    assert r.leaks == 1 and not r.errors
    b.close()
    patch(img, 0x20000 + 2 * 5, struct.pack(">H", 0))              # cluster 5: the data cluster
    b = Qcow2Backend(img, read_only=True)
    r = check_qcow2(b)
    assert r.errors and "refcount 0" in r.errors[0]
    b.close()
