"""What a crafted qcow2 image can make pyvirt spend: every allocation sized by a header
field is bounded (by the file's size, by the disk's size, by a budget shared by a whole
backing chain) or refused in one line.  Memory is measured with tracemalloc."""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyvirt.backends import qcow2, qcow2_tools
from pyvirt.backends.qcow2 import ChainBudget, Qcow2Backend
from pyvirt.backends.qcow2_format import EXT_FEATURE_NAMES, MAX_EXTENSIONS
from pyvirt.backends.qcow2_tools import check_qcow2, create_qcow2
from pyvirt.errors import ImageError

MIB = 1 << 20


def craft(path: Path, *, cb: int = 9, l1_size: int = 0, l1: bytes = b"", rt_clusters: int = 1,
          rt: bytes = b"", nb_snap: int = 0, snap_off: int = 0, snaps: bytes = b"",
          ext: bytes = b"", backing: str = "", file_size: int = 0) -> None:
    """A version 3 image: header and extensions in cluster 0, the refcount table from
    cluster 1, the L1 table after it; the file is sparse up to `file_size`."""
    cs = 1 << cb
    rt_off = cs
    l1_off = rt_off + rt_clusters * cs
    size = max(l1_size, 1) * (cs // 8) * cs
    name = backing.encode()
    back_off = 104 + len(ext) + 8 if name else 0
    hdr = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 3, back_off, len(name), cb, size, 0, l1_size,
                      l1_off if l1_size else 0, rt_off, rt_clusters, nb_snap, snap_off)
    hdr += struct.pack(">QQQII", 0, 0, 0, 4, 104) + ext + bytes(8) + name
    assert len(hdr) <= cs
    with open(path, "wb") as f:
        f.write(hdr)
        f.truncate(max(file_size, l1_off + l1_size * 8, snap_off + len(snaps) + cs))
        f.seek(rt_off)
        f.write(rt)
        f.seek(l1_off)
        f.write(l1)
        if snaps:
            f.seek(snap_off)
            f.write(snaps)


def entries(values: Any) -> bytes:
    return b"".join(struct.pack(">Q", v) for v in values)


def measured(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn's result or the ImageError it raised, peak bytes allocated while it ran)."""
    tracemalloc.start()
    try:
        try:
            out: Any = fn()
        except ImageError as e:
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def one_line(e: Any) -> str:
    assert isinstance(e, ImageError), e
    msg = str(e)
    assert msg and "\n" not in msg
    return msg


def test_an_l1_table_of_pointers_outside_the_file_costs_only_its_bytes(tmp_path: Path) -> None:
    # 1M distinct L2 pointers, all past the file's end: before, each went into a set at
    # open (76 MiB for this 8 MiB table, 304 MiB for a 32 MiB one); now they cost nothing
    # until used, and using one is a corrupt-image error.
    n = 1 << 20
    craft(tmp_path / "x.qcow2", l1_size=n, l1=entries((n + 1 + i) << 9 for i in range(n)))
    b, peak = measured(lambda: Qcow2Backend(tmp_path / "x.qcow2", read_only=True))
    try:
        assert peak < n * 8 + 2 * MIB
        with pytest.raises(OSError, match="beyond the end of the file"):
            b.readinto(0, memoryview(bytearray(512)))
    finally:
        b.close()


def test_an_l1_table_is_read_only_as_far_as_the_disk_reaches(tmp_path: Path) -> None:
    # l1_size says 1M entries (8 MiB), the disk needs one: the rest is never read.  What
    # is left is the index of the table's 16 Ki clusters (metadata no data write may
    # land on), charged to the budget.
    n = 1 << 20
    craft(tmp_path / "x.qcow2", l1_size=n)
    with open(tmp_path / "x.qcow2", "r+b") as f:      # a 4 KiB disk
        f.seek(24)
        f.write(struct.pack(">Q", 4096))
    b, peak = measured(lambda: Qcow2Backend(tmp_path / "x.qcow2", read_only=True))
    b.close()
    assert peak < 2 * MIB


def test_l1_pointers_inside_a_sparse_file_are_refused_past_the_budget(tmp_path: Path,
                                                                       monkeypatch) -> None:
    # 256 Ki distinct in-file pointers (a 128 MiB sparse file): the index they need is
    # charged to the budget as it grows and the image is refused, in one line, before it
    # holds much more than the budget.
    monkeypatch.setattr(qcow2, "TABLE_BUDGET", 8 * MIB)
    n = 1 << 18
    craft(tmp_path / "x.qcow2", l1_size=n, l1=entries((4096 + i) << 9 for i in range(n)),
          file_size=(4096 + n + 1) << 9)
    e, peak = measured(lambda: Qcow2Backend(tmp_path / "x.qcow2", read_only=True))
    assert "need over 8 MiB of memory" in one_line(e)
    assert peak < 8 * MIB + 2 * MIB


def test_a_big_refcount_table_is_charged_too(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(qcow2, "TABLE_BUDGET", 4 * MIB)
    rt_clusters = (8 * MIB) // 512                   # 8 MiB: QEMU's largest
    craft(tmp_path / "x.qcow2", rt_clusters=rt_clusters, l1_size=1)
    e, peak = measured(lambda: Qcow2Backend(tmp_path / "x.qcow2", read_only=True))
    assert "more than pyvirt allows" in one_line(e)
    assert peak < MIB                                  # refused before the table is read


def test_a_backing_chain_shares_one_budget(tmp_path: Path) -> None:
    # 32 images, each with a 4 MiB L1 table (sparse, so on disk they cost nothing):
    # 128 MiB of tables, where one image may hold up to the 64 MiB budget.  Before, the
    # chain opened and held every table.
    n = (4 * MIB) // 8
    prev = ""
    for i in range(32):
        craft(tmp_path / f"b{i}.qcow2", l1_size=n, backing=prev)
        prev = f"b{i}.qcow2"
    e, peak = measured(lambda: Qcow2Backend(tmp_path / "b31.qcow2", read_only=True))
    assert "backing file of" in one_line(e) and "64 MiB" in str(e)
    assert peak < qcow2.TABLE_BUDGET + 8 * MIB


def test_a_backing_chains_cached_tables_share_one_budget(tmp_path: Path, monkeypatch) -> None:
    # Eight images, each with data in every L2 table's range: a read through the chain
    # caches tables in every image, within one budget for the chain; reads stay right.
    monkeypatch.setattr(qcow2, "L2_CACHE_BYTES", 8 * 512)
    size = 64 * (512 // 8) * 512                     # 64 L2 tables' worth
    prev: Path | None = None
    for i in range(8):
        p = tmp_path / f"c{i}.qcow2"
        create_qcow2(p, size, cluster_size=512, backing=prev)
        b = Qcow2Backend(p)
        for t in range(i, 64, 8):                    # image i holds every 8th L2 range
            b.write(t * 32768, bytes([i + 1]) * 512)
        b.close()
        prev = p
    assert prev is not None
    top = Qcow2Backend(prev, read_only=True)
    try:
        budget: ChainBudget = top._budget
        buf = bytearray(512)
        for t in range(64):
            top.readinto(t * 32768, memoryview(buf))
            assert buf == bytes([t % 8 + 1]) * 512
            cached, img = 0, top
            while img is not None:
                cached += sum(len(c) for c in (img._l2_cache, img._rb_cache)) * 512
                img = img.backing
            assert cached == budget.cache <= budget.cache_limit + 8 * 512
    finally:
        top.close()


def test_a_snapshot_count_bigger_than_the_file_is_refused(tmp_path: Path) -> None:
    craft(tmp_path / "x.qcow2", l1_size=1, nb_snap=65536, snap_off=4096)
    e, _ = measured(lambda: Qcow2Backend(tmp_path / "x.qcow2", read_only=True))
    assert "snapshot table" in one_line(e) and "beyond the end of the file" in str(e)


def test_checking_crafted_snapshot_tables_is_bounded(tmp_path: Path, monkeypatch) -> None:
    # 4096 snapshots, each naming the same 1 MiB L1 table full of one L2 pointer: 4 GiB of
    # L1 entries to walk before.  The walk stops at its budget and the check says so.
    monkeypatch.setattr(qcow2_tools, "SNAPSHOT_WALK_BYTES", 4 * MIB)
    cs, nsnap, l1n = 512, 4096, MIB // 8
    l1_off = 64 * cs
    snap = struct.pack(">QIHHIIQII", l1_off, l1n, 0, 0, 0, 0, 0, 0, 0)
    craft(tmp_path / "x.qcow2", l1_size=1, nb_snap=nsnap, snap_off=8 * MIB, snaps=snap * nsnap,
          file_size=16 * MIB)
    with open(tmp_path / "x.qcow2", "r+b") as f:
        f.seek(l1_off)
        f.write(entries([2 * MIB] * 16))
    b = Qcow2Backend(tmp_path / "x.qcow2", read_only=True)
    try:
        t = time.process_time()
        res = check_qcow2(b)
        assert time.process_time() - t < 20
        assert res.incomplete == "snapshot tables"
        assert "snapshot tables not counted" in res.summary()
    finally:
        b.close()


def test_too_many_header_extensions_are_refused(tmp_path: Path) -> None:
    ext = struct.pack(">II", 0x12345678, 0) * (MAX_EXTENSIONS + 1)
    craft(tmp_path / "x.qcow2", cb=12, l1_size=1, ext=ext)
    e, _ = measured(lambda: Qcow2Backend(tmp_path / "x.qcow2", read_only=True))
    assert f"more than {MAX_EXTENSIONS} header extensions" in one_line(e)


def test_a_feature_name_table_keeps_only_real_features(tmp_path: Path) -> None:
    # 80 entries for (type, bit) pairs that cannot exist and two real ones: only those kept.
    body = b"".join(struct.pack(">BB46s", 3 + i // 64, i % 64, b"junk") for i in range(80))
    body += struct.pack(">BB46s", 0, 9, b"nine") + struct.pack(">BB46s", 1, 70, b"no such bit")
    craft(tmp_path / "x.qcow2", cb=12, l1_size=1, ext=struct.pack(">II", EXT_FEATURE_NAMES, len(body)) + body)
    b = Qcow2Backend(tmp_path / "x.qcow2", read_only=True)
    try:
        assert b.header.feature_names == {(0, 9): "nine"}
    finally:
        b.close()
