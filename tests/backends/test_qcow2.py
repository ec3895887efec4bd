"""qcow2 against QEMU, both ways: images qemu-img made, written by pyvirt and checked by
qemu-img; images pyvirt made, written by pyvirt, read back by qemu-img."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from pyvirt.backends.block import RawFileBackend
from pyvirt.backends.disk import ProbedRawBackend, open_disk
from pyvirt.backends.qcow2 import Qcow2Backend
from pyvirt.backends.qcow2_tools import check_qcow2, create_qcow2
from pyvirt.testing import qemu_img as q

pytestmark = pytest.mark.skipif(q.QEMU_IMG is None or q.QEMU_IO is None,
                                reason="needs qemu-img and qemu-io (Debian: qemu-utils)")

KIB, MIB = 1 << 10, 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def read_all(b) -> bytes:
    buf = bytearray(b.size)
    # in a few uneven pieces, so reads cross clusters and buffers
    views = [memoryview(buf)[:1000], memoryview(buf)[1000:b.size // 2], memoryview(buf)[b.size // 2:]]
    b.readv(0, [v for v in views if len(v)])
    return bytes(buf)


def some_writes(size: int, cs: int, seed: int, n: int = 14) -> list[tuple[int, bytes]]:
    """Writes of every shape: inside one cluster, across a boundary, whole clusters, many clusters."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        shape = i % 5
        if shape == 0:                                   # a few bytes, anywhere
            off, length = rng.randrange(size - 100), rng.randrange(1, 100)
        elif shape == 1:                                 # a sector across a cluster boundary
            off = rng.randrange(1, size // cs) * cs - 256
            length = 512
        elif shape == 2:                                 # whole aligned clusters
            length = cs * rng.randrange(1, 4)
            off = rng.randrange(0, (size - length) // cs + 1) * cs
        elif shape == 3:                                 # unaligned, several clusters
            length = rng.randrange(cs, 3 * cs)
            off = rng.randrange(size - length)
        else:                                            # sector-aligned, as a guest writes
            length = 512 * rng.randrange(1, 2 * cs // 512 + 2)
            off = rng.randrange(0, (size - length) // 512) * 512
        out.append((off, pattern(seed * 1000 + i, length)))
    return out


def apply(b, model: bytearray, writes: list[tuple[int, bytes]]) -> None:
    for off, data in writes:
        assert b.write(off, data) == len(data)
        model[off:off + len(data)] = data


def assert_clean(img: Path) -> None:
    chk = q.check(img)
    assert chk["returncode"] == 0, chk
    assert not chk.get("leaks") and not chk.get("corruptions"), chk


def assert_same_as(img: Path, model: bytes, tmp_path: Path) -> None:
    raw = tmp_path / "expected.raw"
    raw.write_bytes(model)
    r = q.compare(img, raw)
    assert r.returncode == 0, r.stdout + r.stderr
    assert q.info(img)["virtual-size"] == len(model)


def make_base(tmp_path: Path, kind: str | None, size: int) -> tuple[Path | None, bytes]:
    """A backing file and its contents: raw of an odd length, or qcow2 written by qemu-io."""
    if kind is None:
        return None, b""
    if kind == "raw":
        base = tmp_path / "base.raw"
        data = pattern(7, size - 300)                  # a partial last sector, still shown
        base.write_bytes(data)
        return base, data + bytes(300)
    base = q.create(tmp_path / "base.qcow2", size)
    q.qemu_io(base, "write -P 0x5a 0 100k", f"write -P 0xa5 {size - 70 * KIB} 70k",
              f"write -P 0x3c {size // 2} 4k")
    return base, q.to_raw(base)


# -- images made by qemu-img, written by pyvirt -------------------------------------------------
@pytest.mark.parametrize("backing", [None, "raw", "qcow2"])
@pytest.mark.parametrize("cs", [4 * KIB, 64 * KIB])
def test_qemu_image_written_by_pyvirt(tmp_path: Path, cs: int, backing: str | None) -> None:
    size = 3 * MIB
    base, _ = make_base(tmp_path, backing, 2 * MIB)
    img = q.create(tmp_path / "disk.qcow2", size, cluster_size=cs, backing=base, backing_fmt=backing)
    # What QEMU itself leaves in an image: data, zero clusters (with and without a host
    # cluster), a discarded cluster, data across an L2 table's reach.
    q.qemu_io(img, "write -P 0x11 0 8k", f"write -P 0x22 {5 * cs} {cs}", f"write -z {7 * cs} {2 * cs}",
              f"write -P 0x33 {10 * cs} {2 * cs}", f"write -z {10 * cs} {cs}",
              f"write -P 0x44 {14 * cs} {cs}", f"discard {14 * cs} {cs}",
              f"write -P 0x55 {size - 3 * cs} {3 * cs}")
    model = bytearray(q.to_raw(img))
    b = Qcow2Backend(img)
    assert read_all(b) == model
    apply(b, model, some_writes(size, cs, seed=cs + len(backing or "")))
    apply(b, model, [(10 * cs + 100, b"x" * 50), (7 * cs, b"y" * 512)])    # into zero clusters
    b.discard(2 * cs, 3 * cs)
    model[2 * cs:5 * cs] = bytes(3 * cs)
    b.discard(12 * cs + 17, cs)                                             # partial: zeros written
    model[12 * cs + 17:13 * cs + 17] = bytes(cs)
    assert read_all(b) == model
    b.close()
    assert_clean(img)
    assert_same_as(img, bytes(model), tmp_path)


# -- images made by pyvirt, read by qemu-img ------------------------------------------------------
@pytest.mark.parametrize("backing", [None, "raw", "qcow2"])
@pytest.mark.parametrize("cs", [512, 4 * KIB, 64 * KIB])
def test_pyvirt_image_read_by_qemu(tmp_path: Path, cs: int, backing: str | None) -> None:
    size = 2 * MIB + 64 * KIB
    base, base_data = make_base(tmp_path, backing, 2 * MIB)
    img = tmp_path / "disk.qcow2"
    create_qcow2(img, size, cluster_size=cs, backing=base, backing_format=backing)
    assert_clean(img)
    info = q.info(img)
    assert (info["virtual-size"], info["cluster-size"]) == (size, cs)
    assert info["format-specific"]["data"]["compat"] == "1.1"
    if base is not None:
        assert Path(info["full-backing-filename"]) == base
        assert info["backing-filename-format"] == backing
    model = bytearray(base_data[:size].ljust(size, b"\0"))
    b = Qcow2Backend(img)
    assert read_all(b) == model == q.to_raw(img)
    apply(b, model, some_writes(size, cs, seed=cs * 3 + len(backing or "")))
    b.flush()
    b.discard(cs, 4 * cs)
    model[cs:5 * cs] = bytes(4 * cs)
    apply(b, model, [(cs * 2 + 5, b"after discard")])
    b.close()
    assert_clean(img)
    ro = Qcow2Backend(img, read_only=True)
    assert read_all(ro) == model == q.to_raw(img)
    assert not check_qcow2(ro).errors and check_qcow2(ro).leaks == 0
    ro.close()


def test_relative_backing_path_is_recorded_from_the_image(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("base.raw").write_bytes(pattern(1, 1 * MIB))
    Path("vm").mkdir()
    create_qcow2("vm/top.qcow2", None, backing="base.raw")        # size: the backing file's
    info = q.info(tmp_path / "vm/top.qcow2")
    assert info["backing-filename"] == "../base.raw"
    assert info["virtual-size"] == 1 * MIB
    b = Qcow2Backend(tmp_path / "vm/top.qcow2", read_only=True)
    assert read_all(b) == pattern(1, 1 * MIB)
    b.close()


# -- compressed clusters ------------------------------------------------------------------------
@pytest.mark.parametrize("cs", [4 * KIB, 64 * KIB])
def test_compressed_clusters(tmp_path: Path, cs: int) -> None:
    size = 1 * MIB
    raw = tmp_path / "src.raw"
    text = b"".join(b"line %06d of some very compressible text\n" % i for i in range(size // 40))
    data = bytearray(text[:size].ljust(size, b"\0"))
    data[300 * KIB:340 * KIB] = pattern(3, 40 * KIB)           # incompressible: stored plain
    data[600 * KIB:700 * KIB] = bytes(100 * KIB)               # zeros: not stored at all
    raw.write_bytes(data)
    img = tmp_path / "c.qcow2"
    q.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cs}", raw, img)
    b = Qcow2Backend(img)
    assert read_all(b) == data
    res = check_qcow2(b)
    assert res.compressed > 0 and not res.errors and res.leaks == 0
    # Writes into compressed clusters: copied out to new clusters, the old ones freed.
    model = bytearray(data)
    apply(b, model, [(cs + 10, b"partial"), (4 * cs, pattern(4, cs)), (5 * cs - 3, b"across"),
                     (size - cs, pattern(5, cs))])
    b.discard(8 * cs, 2 * cs)
    model[8 * cs:10 * cs] = bytes(2 * cs)
    assert read_all(b) == model
    b.close()
    assert_clean(img)
    assert_same_as(img, bytes(model), tmp_path)


# -- backing chains -----------------------------------------------------------------------------
def test_overlay_over_a_backing_chain(tmp_path: Path) -> None:
    size = 4 * MIB
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(10, size))
    mid = q.create(tmp_path / "mid.qcow2", size, cluster_size=4 * KIB, backing=base, backing_fmt="raw")
    q.qemu_io(mid, "write -P 0x77 64k 128k", "write -z 1m 64k", "write -P 0x78 3m 4k")
    top = tmp_path / "top.qcow2"
    create_qcow2(top, None, backing=mid, backing_format="qcow2")
    frozen = base.read_bytes(), mid.read_bytes()
    model = bytearray(q.to_raw(mid))
    b = Qcow2Backend(top)
    assert read_all(b) == model
    assert b.backing.backing is not None                     # the whole chain is open
    apply(b, model, some_writes(size, 64 * KIB, seed=99) + [(1 * MIB + 10, b"on the zero cluster")])
    b.discard(0, 256 * KIB)                                  # the zero flag hides the backing file
    model[:256 * KIB] = bytes(256 * KIB)
    assert read_all(b) == model
    b.close()
    assert (base.read_bytes(), mid.read_bytes()) == frozen
    assert_clean(top)
    assert_same_as(top, bytes(model), tmp_path)


def test_backing_file_smaller_than_the_overlay(tmp_path: Path) -> None:
    base = tmp_path / "small.raw"
    base.write_bytes(b"\xee" * 1000)                         # not even two sectors
    top = tmp_path / "top.qcow2"
    create_qcow2(top, 1 * MIB, cluster_size=512, backing=base, backing_format="raw")
    b = Qcow2Backend(top)
    model = bytearray(1 * MIB)
    model[:1000] = b"\xee" * 1000
    assert read_all(b) == model
    apply(b, model, [(900, b"z" * 300)])                     # copy-on-write across the tail
    assert read_all(b) == model
    b.close()
    assert_clean(top)
    assert_same_as(top, bytes(model), tmp_path)


# -- format variants ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32, 64])
def test_refcount_widths(tmp_path: Path, bits: int) -> None:
    size = 1 * MIB
    img = q.create(tmp_path / "r.qcow2", size, cluster_size=4 * KIB, options=(f"refcount_bits={bits}",))
    q.qemu_io(img, "write -P 1 0 64k")
    model = bytearray(q.to_raw(img))
    b = Qcow2Backend(img)
    apply(b, model, some_writes(size, 4 * KIB, seed=bits))
    b.close()
    assert_clean(img)
    assert_same_as(img, bytes(model), tmp_path)


@pytest.mark.parametrize("backing", [False, True])
def test_version_2_images(tmp_path: Path, backing: bool) -> None:
    size = 1 * MIB
    base = None
    if backing:
        base = tmp_path / "b.raw"
        base.write_bytes(pattern(2, size))
    img = q.create(tmp_path / "v2.qcow2", size, cluster_size=4 * KIB, options=("compat=0.10",),
                   backing=base, backing_fmt="raw")
    q.qemu_io(img, "write -P 9 8k 8k")
    model = bytearray(q.to_raw(img))
    b = Qcow2Backend(img)
    assert b.version == 2
    apply(b, model, some_writes(size, 4 * KIB, seed=22))
    b.discard(64 * KIB, 64 * KIB)                 # no zero flag in v2: zeros are written if needed
    model[64 * KIB:128 * KIB] = bytes(64 * KIB)
    assert read_all(b) == model
    b.close()
    assert_clean(img)
    assert_same_as(img, bytes(model), tmp_path)


def test_preallocated_metadata(tmp_path: Path) -> None:
    img = q.create(tmp_path / "p.qcow2", 1 * MIB, cluster_size=64 * KIB, options=("preallocation=metadata",))
    model = bytearray(1 * MIB)
    b = Qcow2Backend(img)
    assert read_all(b) == model
    apply(b, model, [(100, b"in place"), (200 * KIB, pattern(1, 100 * KIB))])
    b.close()
    assert_clean(img)
    assert_same_as(img, bytes(model), tmp_path)


def test_refcount_table_grows(tmp_path: Path) -> None:
    """512-byte clusters: one refcount table cluster covers 8 MiB of file; filling a
    12 MiB disk moves the table to the end of the file, twice as large."""
    size = 12 * MIB
    img = tmp_path / "small-clusters.qcow2"
    create_qcow2(img, size, cluster_size=512)
    b = Qcow2Backend(img)
    model = bytearray(size)
    for i in range(12):
        apply(b, model, [(i * MIB, pattern(i, MIB))])
    b.flush()
    rt_offset, rt_clusters = struct.unpack(">QI", (img.read_bytes()[48:60]))
    assert rt_clusters >= 2 and rt_offset > 8 * MIB
    apply(b, model, some_writes(size, 512, seed=5))
    b.close()
    assert_clean(img)
    assert_same_as(img, bytes(model), tmp_path)


def test_internal_snapshots_read_only(tmp_path: Path) -> None:
    img = q.create(tmp_path / "s.qcow2", 1 * MIB)
    q.qemu_io(img, "write -P 1 0 128k")
    q.qemu_img("snapshot", "-c", "first", img)
    q.qemu_io(img, "write -P 2 64k 128k")
    model = q.to_raw(img)
    b = Qcow2Backend(img, read_only=True)
    assert read_all(b) == model
    res = check_qcow2(b)
    assert not res.errors and res.leaks == 0
    b.close()


# -- opening disks by format ------------------------------------------------------------------
def test_open_disk_probes_the_format(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    create_qcow2(img, 1 * MIB)
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(64 * KIB))
    d = open_disk(img)
    assert isinstance(d, Qcow2Backend) and d.size == 1 * MIB
    d.close()
    r = open_disk(raw, read_only=True)
    assert type(r) is ProbedRawBackend and r.read_only
    r.close()
    # A guest may not turn a probed raw disk into a qcow2 image...
    r = open_disk(raw)
    with pytest.raises(OSError, match="qcow2 header"):
        r.write(0, b"QFI\xfb" + bytes(508))
    with pytest.raises(OSError, match="qcow2 header"):
        r.writev(0, [b"QF", b"I\xfb", bytes(508)])
    r.write(0, b"QFI\xfa" + bytes(508))                   # anything else is fine
    r.close()
    # ...but with format=raw it is just bytes.
    r = open_disk(raw, fmt="raw")
    assert type(r) is RawFileBackend
    r.write(0, b"QFI\xfb" + bytes(508))
    r.close()
    q2 = open_disk(raw, read_only=True, fmt="raw")
    q2.close()


def test_save_load(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    create_qcow2(img, 1 * MIB)
    b = Qcow2Backend(img)
    b.write(0, b"a" * 512)
    state = b.save()                                  # metadata written: the file alone holds it
    assert state == {"path": str(img), "size": MIB, "read_only": False, "format": "qcow2"}
    assert q.to_raw(img)[:512] == b"a" * 512
    b.load(state)
    with pytest.raises(Exception, match="snapshot expects"):
        b.load(dict(state, size=2 * MIB))
    b.close()
    b.close()                                         # idempotent


def test_small_table_caches(tmp_path: Path) -> None:
    """Tables dropped from the caches between requests (dirty ones written back first)."""
    size = 4 * MIB
    img = tmp_path / "c.qcow2"
    create_qcow2(img, size, cluster_size=512)             # an L2 table maps 32 KiB
    b = Qcow2Backend(img)
    b._cache_max = 4
    model = bytearray(size)
    apply(b, model, some_writes(size, 512, seed=77, n=60))
    for i in range(0, size, 96 * KIB):
        apply(b, model, [(i + 100, b"spread over many tables")])
    assert len(b._l2_cache) <= 2 * 4 + 8
    assert read_all(b) == model
    b.close()
    assert_clean(img)
    assert_same_as(img, bytes(model), tmp_path)
