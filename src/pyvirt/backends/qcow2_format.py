"""The qcow2 format: constants, the header and its checks (QEMU's docs/interop/qcow2.txt).

A qcow2 file is cut into clusters of 2**cluster_bits bytes; every number in it
is big-endian::

    cluster 0         header (72 bytes in version 2, header_length in version 3),
                      header extensions, the backing file's name
    L1 table          l1_size 8-byte entries, contiguous: each points to an L2 table
    L2 tables         one cluster each, cluster_size/8 entries: each maps a guest
                      cluster to a host cluster (standard), to deflated bytes
                      (compressed), to zeros (the zero flag, version 3) or to
                      nothing (unallocated: read from the backing file, or zeros)
    refcount table    contiguous, 8-byte entries pointing to refcount blocks
    refcount blocks   one cluster each: a 2**refcount_order-bit count per host cluster

`parse_header` checks everything the header says before any of it is used;
the backend (qcow2.py) checks every table entry when it reads one.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvirt.compat import DATACLASS_SLOTS
from pyvirt.errors import ImageCorruptError, ImageError

MAGIC = b"QFI\xfb"
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")     # the 72 bytes every version has
_HEADER_V3 = struct.Struct(">QQQII")              # bytes 72..103 of version 3
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 << 20          # QEMU's limits on the tables' sizes
MAX_RT_BYTES = 8 << 20
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536
SNAPSHOT_ENTRY_MIN = 40          # the fixed part of a snapshot table entry
MAX_EXTENSIONS = 64              # header extensions (QEMU writes at most five)

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                   3: "compression type", 4: "extended L2 entries"}
AUTOCLEAR_BITMAPS = 1 << 0

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# L1, L2 and refcount table entries
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00     # bits 9-55: a cluster's offset in the file
COPIED = 1 << 63                        # refcount exactly one: may be written in place
COMPRESSED = 1 << 62
ZERO = 1 << 0                           # standard L2 entry: the cluster reads as zeros
L1_RESERVED = 0x7F00_0000_0000_01FF     # bits 0-8 and 56-62
L2_RESERVED = 0x3F00_0000_0000_01FE     # standard descriptor: bits 1-8 and 56-61
RT_RESERVED = 0x1FF



@dataclass(**DATACLASS_SLOTS)
class Qcow2Header:
    """The header of a qcow2 image, validated (see `parse_header`)."""

    version: int
    cluster_bits: int
    size: int                          # virtual disk size in bytes
    l1_size: int
    l1_offset: int
    rt_offset: int
    rt_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    extensions: list[int] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def max_virtual_size(cluster_bits: int) -> int:
    """The largest disk an L1 table of QEMU's maximum size (32 MiB) can map."""
    cs = 1 << cluster_bits
    return (MAX_L1_BYTES // 8) * (cs // 8) * cs


def parse_header(data: bytes, file_size: int, name: str = "image") -> Qcow2Header:
    """Parse and check the first cluster of a qcow2 image (`data`: at least its first
    `min(file size, cluster size)` bytes).  Raises ImageError for what pyvirt does not
    support and ImageCorruptError for what breaks the format; both one line."""
    def corrupt(what: str) -> ImageCorruptError:
        return ImageCorruptError(f"disk image {name} is corrupt: {what}")

    def unsupported(what: str) -> ImageError:
        return ImageError(f"disk image {name} {what}, which pyvirt does not support")

    if len(data) < V2_HEADER_LENGTH:
        raise ImageError(f"disk image {name} is too short to be a qcow2 image")
    (magic, version, backing_offset, backing_len, cluster_bits, size, crypt, l1_size, l1_offset,
     rt_offset, rt_clusters, nb_snapshots, snapshots_offset) = _HEADER_V2.unpack_from(data)
    if magic != MAGIC:
        raise ImageError(f"disk image {name} is not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise unsupported(f"is qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise corrupt(f"cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cs = 1 << cluster_bits
    h = Qcow2Header(version, cluster_bits, size, l1_size, l1_offset, rt_offset, rt_clusters,
                    nb_snapshots, snapshots_offset)
    if version == 3:
        if len(data) < V3_HEADER_LENGTH:
            raise corrupt("version 3 header is cut short")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = _HEADER_V3.unpack_from(data, V2_HEADER_LENGTH)
        if (h.header_length < V3_HEADER_LENGTH or h.header_length % 8
                or h.header_length > min(cs, len(data))):
            raise corrupt(f"header_length {h.header_length} is invalid")
        if h.refcount_order > 6:
            raise corrupt(f"refcount_order {h.refcount_order} is above 6")
        if h.header_length > V3_HEADER_LENGTH:
            h.compression_type = data[V3_HEADER_LENGTH]
    ext_end = backing_offset if backing_offset else cs
    _parse_extensions(h, data[:min(ext_end, cs, len(data))], corrupt)

    def feature(bit: int) -> str:
        return h.feature_names.get((0, bit)) or _INCOMPAT_NAMES.get(bit) or f"incompatible feature bit {bit}"

    unknown = h.incompatible & ~0x1F
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        raise unsupported(f"uses an unknown feature ({feature(bit)})")
    if h.incompatible & INCOMPAT_DATA_FILE:
        raise unsupported("keeps its data in an external data file")
    if h.incompatible & INCOMPAT_EXTL2:
        raise unsupported("uses extended L2 entries (subclusters)")
    if h.incompatible & INCOMPAT_COMPRESSION:
        if h.compression_type == 0:
            raise corrupt("compression type bit set without a compression type")
        kind = {1: "zstd"}.get(h.compression_type, f"type {h.compression_type}")
        raise unsupported(f"uses {kind} compression")
    if h.compression_type:
        raise corrupt("compression type set without its incompatible feature bit")
    if crypt:
        raise unsupported("is encrypted")
    if EXT_CRYPTO in h.extensions:
        raise corrupt("encryption header extension in an image without encryption")

    # The tables: sizes, alignment, inside the file, out of the header cluster.
    l2_entries = cs // 8
    need_l1 = -(-size // (l2_entries * cs))
    if l1_size * 8 > MAX_L1_BYTES:
        raise unsupported(f"has an L1 table of {l1_size} entries")
    if l1_size < need_l1:
        raise corrupt(f"L1 table of {l1_size} entries is too small for a {size}-byte disk")
    if l1_size:
        _check_table(l1_offset, l1_size * 8, cs, file_size, "L1 table", corrupt)
    if rt_clusters == 0:
        raise corrupt("refcount table has no clusters")
    if rt_clusters * cs > MAX_RT_BYTES:
        raise unsupported(f"has a refcount table of {rt_clusters} clusters")
    _check_table(rt_offset, rt_clusters * cs, cs, file_size, "refcount table", corrupt)
    l1_clusters = range(l1_offset // cs, (l1_offset + l1_size * 8 + cs - 1) // cs) if l1_size else range(0)
    rt_range = range(rt_offset // cs, rt_offset // cs + rt_clusters)
    if l1_clusters and l1_clusters.start < rt_range.stop and rt_range.start < l1_clusters.stop:
        raise corrupt("L1 table and refcount table overlap")
    if nb_snapshots > MAX_SNAPSHOTS:
        raise corrupt(f"{nb_snapshots} snapshots")
    if nb_snapshots:
        # Each entry takes at least 40 bytes of the file: the count is bounded by its size.
        _check_table(snapshots_offset, nb_snapshots * SNAPSHOT_ENTRY_MIN, cs, file_size,
                     "snapshot table", corrupt)

    if backing_offset:
        if backing_len > MAX_BACKING_NAME:
            raise corrupt(f"backing file name of {backing_len} bytes")
        if backing_offset < h.header_length or backing_offset + backing_len > min(cs, len(data)):
            raise corrupt(f"backing file name at {backing_offset:#x} is outside the header cluster")
        raw = bytes(data[backing_offset:backing_offset + backing_len])
        try:
            h.backing_file = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise corrupt("backing file name is not UTF-8") from None
        if not h.backing_file or "\0" in h.backing_file:
            raise corrupt("backing file name is empty or holds a NUL")
    elif h.backing_format is not None:
        h.backing_format = None              # meaningless without a backing file
    return h


def _check_table(offset: int, length: int, cs: int, file_size: int, what: str, corrupt: Any) -> None:
    if offset % cs:
        raise corrupt(f"{what} offset {offset:#x} is not cluster-aligned")
    if offset < cs:
        raise corrupt(f"{what} overlaps the header")
    if offset + length > file_size:
        raise corrupt(f"{what} at {offset:#x} lies beyond the end of the file")


def _parse_extensions(h: Qcow2Header, area: bytes, corrupt: Any) -> None:
    pos = h.header_length if h.version == 3 else V2_HEADER_LENGTH
    while pos + 8 <= len(area):
        kind, length = struct.unpack_from(">II", area, pos)
        if kind == EXT_END:
            return
        start, end = pos + 8, pos + 8 + length
        if end > len(area):
            raise corrupt(f"header extension {kind:#x} runs past the header area")
        if len(h.extensions) >= MAX_EXTENSIONS:
            raise corrupt(f"more than {MAX_EXTENSIONS} header extensions")
        body = bytes(area[start:end])
        h.extensions.append(kind)
        if kind == EXT_BACKING_FORMAT:
            try:
                h.backing_format = body.decode("ascii")
            except UnicodeDecodeError:
                raise corrupt("backing file format is not ASCII") from None
        elif kind == EXT_FEATURE_NAMES:
            for i in range(0, len(body) - 47, 48):
                if body[i] > 2 or body[i + 1] > 63:     # no such feature: not kept (bounded)
                    continue
                name = body[i + 2:i + 48].split(b"\0", 1)[0].decode("ascii", "replace")
                h.feature_names[(body[i], body[i + 1])] = name
        pos = start + _align_up(length, 8)
    # An area that ends without an end marker is allowed: it stops at the cluster's end.


def probe_format(path: str | Path) -> str:
    """'qcow2' when the file starts with qcow2's magic, else 'raw' (also when it cannot be
    read: opening it as raw then gives the error)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "raw"
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == MAGIC else "raw"
    except OSError:
        return "raw"
