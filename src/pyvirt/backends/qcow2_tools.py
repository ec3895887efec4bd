"""qcow2 images outside a VM: create one, check its refcounts, describe it.

`create_qcow2` lays a new version 3 image out as qemu-img does::

    cluster 0                 header, backing format extension, backing file name
    clusters 1..              refcount table, refcount blocks, L1 table (all zeros)

`check_qcow2` counts every reference to every host cluster (header, tables,
L2 tables, data, compressed data, also from internal snapshots) and compares
the counts with the refcounts, as `qemu-img check` does: a refcount below the
references is an error (the cluster could be handed out twice), above them a
leak (space lost, nothing wrong with the data).
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvirt.backends.block import SECTOR
from pyvirt.backends.qcow2 import Qcow2Backend, open_backing, resolve_backing
from pyvirt.backends.qcow2_format import (
    COMPRESSED,
    COPIED,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    L1_RESERVED,
    L2_RESERVED,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    OFFSET_MASK,
    RT_RESERVED,
    V3_HEADER_LENGTH,
    ZERO,
    max_virtual_size,
    probe_format,
)
from pyvirt.compat import DATACLASS_SLOTS
from pyvirt.errors import ImageError

DEFAULT_CLUSTER_SIZE = 64 << 10


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024      # type: ignore[assignment]
    raise AssertionError


def create_qcow2(path: str | Path, size: int | None, *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                 backing: str | Path | None = None, backing_format: str | None = None) -> None:
    """Create a qcow2 version 3 image of `size` bytes (the backing file's size when None).

    `backing` is a path as the user gave it (relative to the current directory); the
    image records it relative to its own directory when it was given relative, as
    QEMU reads it.  Everything is checked before the file is created; an existing
    file is never overwritten.  Errors are one-line ImageErrors.
    """
    path = Path(path)
    cb = cluster_size.bit_length() - 1
    if cluster_size != 1 << cb or not MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS:
        raise ImageError(f"cluster size {cluster_size} is not a power of two from 512 to 2 MiB")
    backing_name = fmt = None
    if backing is not None:
        bpath = Path(backing)
        try:
            b = open_backing(bpath, backing_format, ())
        except ImageError as e:
            raise ImageError(f"backing file: {e}") from None
        try:
            fmt = backing_format or getattr(b, "format", "raw")
            bsize = b.size
        finally:
            b.close()
        if size is None:
            size = -(-bsize // SECTOR) * SECTOR
        backing_name = str(bpath) if bpath.is_absolute() else os.path.relpath(
            os.path.abspath(bpath), os.path.dirname(os.path.abspath(path)))
        if len(backing_name.encode()) > MAX_BACKING_NAME:
            raise ImageError(f"backing file name {backing_name!r} is too long")
    if size is None:
        raise ImageError("a new disk image needs a size (or a backing file to take it from)")
    if size < 0 or size % SECTOR:
        raise ImageError(f"disk size {size} is not a multiple of {SECTOR} bytes")
    if size > max_virtual_size(cb):
        raise ImageError(f"disk size {_human(size)} is too large (at most {_human(max_virtual_size(cb))} "
                         f"with {_human(cluster_size)} clusters)")
    if path.exists() or path.is_symlink():
        raise ImageError(f"{path} already exists")
    data = _layout(size, cb, backing_name, fmt)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ImageError(f"cannot create {path}: {e.strerror}") from None
    try:
        try:
            for offset, chunk in data["chunks"]:
                os.pwrite(fd, chunk, offset)
            os.ftruncate(fd, data["file_size"])
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        path.unlink()
        raise ImageError(f"cannot write {path}: {e.strerror}") from None


def _layout(size: int, cb: int, backing: str | None, fmt: str | None) -> dict[str, Any]:
    cs = 1 << cb
    l1_size = -(-size // ((cs // 8) * cs))
    l1_clusters = max(1, -(-(l1_size * 8) // cs))
    rbe = cs * 8 // 16                               # 16-bit refcounts
    rt_clusters = rb_count = 1
    while True:                                      # until the tables count themselves
        total = 1 + rt_clusters + rb_count + l1_clusters
        need_rb = -(-total // rbe)
        need_rt = -(-(need_rb * 8) // cs)
        if (need_rb, need_rt) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = max(rb_count, need_rb), max(rt_clusters, need_rt)
    rt_offset = cs
    rb_offset = rt_offset + rt_clusters * cs
    l1_offset = rb_offset + rb_count * cs
    header = bytearray(struct.pack(">4sIQIIQIIQQIIQQQQII", MAGIC, 3, 0, 0, cb, size, 0, l1_size,
                                   l1_offset, rt_offset, rt_clusters, 0, 0, 0, 0, 0, 4,
                                   V3_HEADER_LENGTH))
    if backing is not None:
        assert fmt is not None
        name = fmt.encode()
        header += struct.pack(">II", EXT_BACKING_FORMAT, len(name)) + name
        header += bytes(-len(header) % 8)
    header += bytes(8)                               # end of the extensions
    if backing is not None:
        name = backing.encode()
        struct.pack_into(">QI", header, 8, len(header), len(name))
        header += name
    if len(header) > cs:
        raise ImageError(f"the header does not fit a {cs}-byte cluster (backing file name too long)")
    rt = bytearray(rt_clusters * cs)
    for i in range(rb_count):
        struct.pack_into(">Q", rt, i * 8, rb_offset + i * cs)
    rb = bytearray(rb_count * cs)
    for c in range(total):
        struct.pack_into(">H", rb, c * 2, 1)
    return {"chunks": [(0, bytes(header)), (rt_offset, bytes(rt)), (rb_offset, bytes(rb))],
            "file_size": l1_offset + l1_clusters * cs}


@dataclass(**DATACLASS_SLOTS)
class CheckResult:
    errors: list[str] = field(default_factory=list)
    leaks: int = 0                       # clusters whose refcount exceeds their references
    allocated: int = 0                   # clusters with a refcount
    data_clusters: int = 0               # guest clusters mapped to host data (or compressed)
    compressed: int = 0
    incomplete: str | None = None     # what was not counted

    def summary(self) -> str:
        if self.errors:
            head = f"{len(self.errors)} errors (first: {self.errors[0]})"
        else:
            head = "no errors"
        leaks = f"{self.leaks} leaked clusters" if self.leaks else "no leaks"
        tail = f"; {self.incomplete} not counted" if self.incomplete else ""
        return f"{head}, {leaks}{tail}"


SNAPSHOT_WALK_BYTES = 256 << 20


def check_qcow2(b: Qcow2Backend, max_errors: int = 100) -> CheckResult:
    """Compare every cluster's refcount with its references (see the module's notes).

    `b` is open (read-only is enough); its metadata is written back first."""
    b._writeback()
    h, cs, cb = b.header, b.cluster_size, b.cluster_bits
    fd = b.fd
    file_size = os.fstat(fd).st_size
    res = CheckResult()
    refs: Counter[int] = Counter()

    def error(msg: str) -> None:
        if len(res.errors) < max_errors:
            res.errors.append(msg)

    def read(off: int, n: int) -> bytes:
        return os.pread(fd, n, off)

    def ref_range(off: int, n: int) -> None:
        for c in range(off >> cb, (off + n + cs - 1) >> cb):
            refs[c] += 1

    def cluster_ptr(off: int, what: str) -> int:
        if off % cs or off < cs or off + cs > -(-file_size // cs) * cs:
            error(f"{what} at {off:#x} is misaligned or outside the file")
            return 0
        return off

    # Snapshots' tables are walked up to a budget (a crafted table of 65536 snapshots with
    # 32 MiB L1 tables would take hours); past it the check says it is incomplete.
    walk_left = SNAPSHOT_WALK_BYTES
    ref_range(0, cs)
    if h.l1_size:
        ref_range(h.l1_offset, h.l1_size * 8)
    ref_range(b._rt_offset, len(b._rt))
    refcounts: dict[int, int] = {}
    blocks: set[int] = set()
    for rti, (e,) in enumerate(struct.iter_unpack(">Q", b._rt)):
        if not e:
            continue
        if e & RT_RESERVED:
            error(f"refcount table entry {rti} has reserved bits set")
            continue
        if not cluster_ptr(e, f"refcount block {rti}"):
            continue
        refs[e >> cb] += 1
        if e in blocks:                      # counted, not read again: the work stays bounded
            continue
        blocks.add(e)
        block = bytearray(read(e, cs))
        block += bytes(cs - len(block))
        base = rti * b._rbe
        if h.refcount_order == 4:            # the usual width, without a Python call per entry
            for i, (rc,) in enumerate(struct.iter_unpack(">H", block)):
                if rc:
                    refcounts[base + i] = rc
            continue
        for i in range(b._rbe):
            rc = b._rc_get(block, i)
            if rc:
                refcounts[base + i] = rc

    def walk_l1(l1_off: int, l1_size: int, active: bool) -> bool:
        if l1_size * 8 > 32 << 20 or l1_off % cs or l1_off + l1_size * 8 > file_size:
            error(f"L1 table at {l1_off:#x} ({l1_size} entries) is invalid")
            return False
        walked: set[int] = set()
        nonlocal walk_left
        if not active:
            walk_left -= l1_size * 8
            if walk_left < 0:               # 65536 snapshots of 32 MiB L1 tables: bounded work
                res.incomplete = "snapshot tables"
                return False
        l1 = b._l1 if active and len(b._l1) == l1_size * 8 else read(l1_off, l1_size * 8)
        for i, (e,) in enumerate(struct.iter_unpack(">Q", l1)):
            if not e & OFFSET_MASK:
                continue
            if e & L1_RESERVED:
                error(f"L1 entry {i} has reserved bits set")
                continue
            off = cluster_ptr(e & OFFSET_MASK, f"L2 table {i}")
            if not off:
                continue
            refs[off >> cb] += 1
            if active and bool(e & COPIED) != (refcounts.get(off >> cb, 0) == 1):
                error(f"L1 entry {i}: COPIED flag does not match refcount "
                      f"{refcounts.get(off >> cb, 0)} of L2 table {off:#x}")
            if off in walked:                # counted; one L1 table naming it twice is an error
                error(f"L2 table {off:#x} named twice in one L1 table")
                continue
            walked.add(off)
            if not active:
                walk_left -= cs
                if walk_left < 0:
                    res.incomplete = "snapshot tables"
                    return False
            walk_l2(read(off, cs), active, i)
        return True

    def walk_l2(table: bytes, active: bool, l1i: int) -> None:
        for j, (e,) in enumerate(struct.iter_unpack(">Q", table)):
            if not e:
                continue
            where = f"L2 entry {l1i}:{j}"
            if e & COMPRESSED:
                desc = e & ~(COPIED | COMPRESSED)
                shift = 62 - (cb - 8)
                start = desc & ((1 << shift) - 1)
                sectors = (desc >> shift) + 1
                end = (start & ~(SECTOR - 1)) + sectors * SECTOR
                if start < cs or start >= file_size:
                    error(f"{where}: compressed cluster at {start:#x} outside the file")
                    continue
                if e & COPIED:
                    error(f"{where}: compressed cluster with the COPIED flag")
                res.compressed += 1
                res.data_clusters += 1
                ref_range(start, end - start)
                continue
            if e & L2_RESERVED:
                error(f"{where} has reserved bits set")
                continue
            off = e & OFFSET_MASK
            if not off:
                continue
            off = cluster_ptr(off, where)
            if not off:
                continue
            refs[off >> cb] += 1
            if not e & ZERO:
                res.data_clusters += 1
            if active and bool(e & COPIED) != (refcounts.get(off >> cb, 0) == 1):
                error(f"{where}: COPIED flag does not match refcount {refcounts.get(off >> cb, 0)} "
                      f"of cluster {off:#x}")

    walk_l1(h.l1_offset, h.l1_size, True)
    if h.nb_snapshots:
        _walk_snapshots(b, file_size, read, ref_range, walk_l1, error)
    if EXT_BITMAPS in h.extensions:
        res.incomplete = "bitmaps"
    for c in sorted(set(refs) | set(refcounts)):
        rc, n = refcounts.get(c, 0), refs.get(c, 0)
        if rc < n:
            error(f"cluster {c} ({c << cb:#x}): refcount {rc}, referenced {n} times")
        elif rc > n and not res.incomplete:
            res.leaks += 1
    res.allocated = len(refcounts)
    return res


def _walk_snapshots(b: Qcow2Backend, file_size: int, read: Any, ref_range: Any, walk_l1: Any,
                    error: Any) -> None:
    h = b.header
    pos = h.snapshots_offset
    for i in range(h.nb_snapshots):
        fixed = read(pos, 40)
        if len(fixed) < 40:
            error(f"snapshot {i} lies beyond the end of the file")
            return
        l1_off, l1_size, id_len, name_len, *_, extra = struct.unpack(">QIHHIIQII", fixed)
        if walk_l1(l1_off, l1_size, False) and l1_size:
            ref_range(l1_off, l1_size * 8)
        elif l1_size:
            return                           # an invalid or unwalked table: the rest is not counted
        pos += 40 + extra + id_len + name_len
        pos += -pos % 8
    ref_range(h.snapshots_offset, pos - h.snapshots_offset)


def describe_image(path: str | Path) -> dict[str, Any]:
    """What `pyvirt disk info` prints: format, sizes, and for qcow2 its layout and check."""
    path = Path(path)
    fmt = probe_format(path)
    info: dict[str, Any] = {"image": str(path), "format": fmt}
    if fmt == "raw":
        from pyvirt.backends.block import RawFileBackend
        r = RawFileBackend(path, read_only=True)
        try:
            st = os.fstat(r.fd)
            info.update(virtual_size=r.size, disk_size=st.st_blocks * 512)
        finally:
            r.close()
        return info
    b = Qcow2Backend(path, read_only=True, open_backing_file=False)
    try:
        h = b.header
        st = os.fstat(b.fd)
        info.update(version=h.version, virtual_size=h.size, disk_size=st.st_blocks * 512,
                    cluster_size=b.cluster_size, refcount_bits=1 << h.refcount_order)
        if h.backing_file:
            try:
                present = resolve_backing(path, h.backing_file).exists()
            except ImageError:
                present = False
            info.update(backing_file=h.backing_file, backing_format=h.backing_format or "probed",
                        backing_present=present)
        if h.nb_snapshots:
            info["snapshots"] = h.nb_snapshots
        flags = [name for bit, name in ((1, "dirty"), (2, "corrupt")) if h.incompatible & bit]
        if flags:
            info["flags"] = flags
        info["check"] = check_qcow2(b)
    finally:
        b.close()
    return info


def format_info(info: dict[str, Any]) -> str:
    lines = [f"image: {info['image']}"]
    fmt = info["format"] + (f" (version {info['version']})" if "version" in info else "")
    lines.append(f"format: {fmt}")
    lines.append(f"virtual size: {_human(info['virtual_size'])} ({info['virtual_size']} bytes)")
    lines.append(f"disk size: {_human(info['disk_size'])}")
    if "cluster_size" in info:
        lines.append(f"cluster size: {info['cluster_size']}")
    if "backing_file" in info:
        missing = "" if info["backing_present"] else ", missing"
        lines.append(f"backing file: {info['backing_file']} (format: {info['backing_format']}{missing})")
    if "refcount_bits" in info:
        lines.append(f"refcount bits: {info['refcount_bits']}")
    if "snapshots" in info:
        lines.append(f"internal snapshots: {info['snapshots']}")
    if "flags" in info:
        lines.append(f"flags: {', '.join(info['flags'])}")
    if "check" in info:
        c: CheckResult = info["check"]
        lines.append(f"check: {c.summary()}")
        lines.append(f"allocated clusters: {c.allocated} ({c.data_clusters} data, "
                     f"{c.compressed} compressed)")
    return "\n".join(lines)
