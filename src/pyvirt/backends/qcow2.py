"""qcow2 disk images, written from QEMU's format specification (docs/interop/qcow2.txt);
the layout, constants and header checks are in qcow2_format.py.

`Qcow2Backend` serves a qcow2 image as a `BlockBackend` (see block.py):

* versions 2 and 3, cluster sizes 512 B .. 2 MiB, refcount widths 1..64 bits;
  refused with a one-line `ImageError`: encryption, external data files, extended
  L2 entries (subclusters), zstd compression, unknown incompatible features, and
  writing to images with internal snapshots, a dirty bit (lazy refcounts) or the
  corrupt bit (they open read-only);
* reads: standard clusters straight into the caller's buffers (preadv), zero
  clusters and unallocated clusters without a backing file as zeros, unallocated
  clusters from the backing file (raw or qcow2, opened read-only with a shared
  lock), compressed clusters inflated (raw deflate, wbits=-12);
* writes: in place into a standard cluster this image alone owns (the L2
  entry's COPIED flag and a refcount of 1); anything else -- unallocated, zero,
  compressed or shared -- gets a new cluster appended at the end of the file,
  filled from the old contents (copy-on-write) where the write covers only part
  of it; refcount blocks and L2 tables are allocated as needed, and the refcount
  table grows (moves) when the file outgrows it;
* discard: whole clusters are deallocated (or get the zero flag when a backing
  file would otherwise show through); partial clusters are written with zeros.

Every offset read from the file is checked before it is used: inside the
file, cluster-aligned where the format says so, not in the header cluster, and
for writes not on any metadata (L1 and refcount tables, L2 tables, refcount
blocks).  A corrupt image is an `ImageError` when opened and an
`ImageCorruptError` (an ImageError and an OSError with EIO, which fails the
guest's request) when found in use; after one, the image takes no more writes.

Crash safety.  Metadata changes (refcounts, L2 and L1 entries) are made in
memory and written back by `flush()` (the guest's FLUSH), in an order such
that every state the file can be in after a crash is consistent:

  1. guest data goes to its clusters at once, before any metadata names them;
  2. refcount blocks are written, then (fdatasync and) the refcount table
     entries naming new ones, then fdatasync: data and refcounts are durable
     before anything points at the new clusters; a moved refcount table is then
     named in the header, and fdatasync;
  3. L2 tables are written (fdatasync before the L1 entries of new tables),
     then L1 entries, then fdatasync;
  4. only then are refcounts of clusters no longer used (copied-over compressed
     clusters, discarded clusters, an old refcount table) decremented;
  5. a cluster whose refcount reaches 0 is free: its space is punched out of the
     file (fallocate PUNCH_HOLE) and it goes on the free list; free clusters at
     the end of the file are cut off (ftruncate, after an fdatasync of their
     zero refcounts).

A crash can therefore lose writes the guest never flushed (the write cache
virtio-blk advertises) and leak clusters (counted but unused: `qemu-img check`
reports leaks, not corruption), but never make a table point at a cluster that
is free or not yet written.  A freed cluster is used again (a single cluster is
taken from the free list, lowest first, before the end of the file grows) only
once its refcount has dropped to 0 in step 4, that is once no durable table names
it any more: new data written into it cannot show through a stale reference
after a crash.  Free clusters of the file as it was opened are found a few
refcount blocks at a time, between requests (`_find_free`).  So a guest that
writes, discards and flushes in a loop keeps the file near its working set.
The dirty bit and lazy refcounts are not used.
"""

from __future__ import annotations

import array
import ctypes
import errno
import heapq
import logging
import os
import struct
import sys
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyvirt.backends.block import (
    SECTOR,
    Buffer,
    RawFileBackend,
    _preadv,
    _pwritev,
    advance,
    open_locked,
)
from pyvirt.backends.qcow2_format import (
    _HEADER_V2,
    COMPRESSED,
    COPIED,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1_RESERVED,
    L2_RESERVED,
    MAGIC,
    MAX_CLUSTER_BITS,
    MAX_RT_BYTES,
    MIN_CLUSTER_BITS,
    OFFSET_MASK,
    RT_RESERVED,
    V2_HEADER_LENGTH,
    ZERO,
    Qcow2Header,
    parse_header,
    probe_format,
)
from pyvirt.errors import ImageCorruptError, ImageError

__all__ = ["COMPRESSED", "COPIED", "MAGIC", "OFFSET_MASK", "ZERO", "Qcow2Backend", "Qcow2Header",
           "open_backing", "parse_header", "probe_format", "resolve_backing"]

log = logging.getLogger(__name__)

MAX_CHAIN = 32                   # backing files below one image

_BE64 = struct.Struct(">Q")

# what a guest cluster is, for reading
_UNALLOC, _ZERO, _DATA, _COMP = range(4)

L2_CACHE_BYTES = 32 << 20        # cached L2 tables / refcount blocks, each
TABLE_BUDGET = 64 << 20          # L1 + refcount tables and their indexes, a whole backing chain
_ENTRY_COST = 128                # bytes a set entry costs at most (its int, slots at a set's lowest fill)
_MAX_FREE_SKIP = 1 << 20         # clusters past the end with refcounts (crash leaks) skipped
_MAX_NEST = 16                   # refcount-block allocations inside one another
_FREE_LOW = 1024                 # free clusters wanted at hand before a write (see _find_free)
_SCAN_BLOCKS = 4                 # refcount blocks scanned for free clusters per request, at most
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_fallocate: Any = None


def _punch(fd: int, offset: int, length: int) -> None:
    """Give the space of [offset, offset+length) back to the host file system (best effort:
    a file system that cannot punch holes keeps it)."""
    global _fallocate
    if _fallocate is None:
        try:
            f = ctypes.CDLL(None, use_errno=True).fallocate
            f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            _fallocate = f
        except (OSError, AttributeError):
            _fallocate = False
    if _fallocate:
        _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


class ChainBudget:
    """What one image and its backing chain may hold in memory, shared by every image in it.

    `tables`: bytes of L1 and refcount tables and the indexes built from them when the
    images are opened (TABLE_BUDGET over the chain); an image whose tables do not fit is
    refused.  `cache`: bytes of L2 tables and refcount blocks cached by the read-only
    images of the chain (L2_CACHE_BYTES over the chain); each such image drops its own
    least recently used tables (down to the one in use) when the chain is over it.  So
    a chain of 32 crafted images costs what one legitimate image may, not 32 times it."""

    __slots__ = ("cache", "cache_limit", "table_limit", "tables")

    def __init__(self, tables: int | None = None, cache: int | None = None) -> None:
        self.table_limit = TABLE_BUDGET if tables is None else tables
        self.cache_limit = L2_CACHE_BYTES if cache is None else cache
        self.tables = 0
        self.cache = 0


def resolve_backing(image: Path, name: str) -> Path:
    """Where a backing file recorded as `name` in `image` is (relative to the image's directory)."""
    if ":" in name.split("/", 1)[0] and not (image.parent / name).exists():
        # json:{...}, nbd://, file: -- QEMU's protocol syntax
        raise ImageError(f"disk image {image} names its backing file {name!r} in a protocol "
                         "syntax pyvirt does not support")
    p = Path(name)
    return p if p.is_absolute() else image.parent / p


def open_backing(path: Path, fmt: str | None, chain: tuple[tuple[int, int], ...],
                 budget: ChainBudget | None = None) -> Any:
    """Open a backing file read-only (shared lock), probing its format when not recorded."""
    fmt = fmt or probe_format(path)
    if fmt == "qcow2":
        return Qcow2Backend(path, read_only=True, _chain=chain, _budget=budget)
    if fmt != "raw":
        raise ImageError(f"backing file {path} has format {fmt!r}; pyvirt reads raw and qcow2")
    raw = RawFileBackend(path, read_only=True)
    # A backing file's last partial sector is still data the overlay shows.
    raw.size = os.fstat(raw.fd).st_size
    return raw


class _Cursor:
    """Walks a list of buffers front to back, handing out views of the next n bytes."""

    __slots__ = ("bufs", "i", "off")

    def __init__(self, bufs: Sequence[Buffer]) -> None:
        self.bufs = advance(bufs, 0)          # flat byte views
        self.i = 0
        self.off = 0

    def take(self, n: int) -> list[memoryview]:
        out = []
        while n > 0:
            b = self.bufs[self.i]
            avail = len(b) - self.off
            if avail <= 0:
                self.i += 1
                self.off = 0
                continue
            k = min(avail, n)
            out.append(b[self.off:self.off + k])
            self.off += k
            n -= k
        return out


def _split(views: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    first, rest = [], []
    for v in views:
        if n >= len(v):
            first.append(v)
            n -= len(v)
        elif n > 0:
            first.append(v[:n])
            rest.append(v[n:])
            n = 0
        else:
            rest.append(v)
    return first, rest


def _zero(views: Sequence[memoryview]) -> None:
    for v in views:
        v[:] = bytes(len(v))


class Qcow2Backend:
    """A qcow2 image file, locked for the lifetime of the backend (see the module's notes)."""

    format = "qcow2"

    def __init__(self, path: str | Path, read_only: bool = False, *, open_backing_file: bool = True,
                 _chain: tuple[tuple[int, int], ...] = (), _budget: ChainBudget | None = None) -> None:
        self.path = Path(path)
        self._budget = _budget if _budget is not None else ChainBudget()
        self.read_only = read_only
        self.backing: Any = None
        self.fd = -1
        self.fd = open_locked(self.path, read_only)
        try:
            self._open(open_backing_file, _chain)
        except BaseException:
            self._close_files()
            raise

    # -- opening -------------------------------------------------------------------------------
    def _corrupt(self, what: str) -> ImageCorruptError:
        return ImageCorruptError(f"disk image {self.path} is corrupt: {what}")

    def _open(self, open_backing_file: bool, chain: tuple[tuple[int, int], ...]) -> None:
        name = str(self.path)
        try:
            st = os.fstat(self.fd)
            file_size = os.lseek(self.fd, 0, os.SEEK_END)
            # The header cluster only (the header says how big): a 512-byte cluster costs 512.
            first = os.pread(self.fd, V2_HEADER_LENGTH, 0)
            if len(first) == V2_HEADER_LENGTH:
                cb0 = max(MIN_CLUSTER_BITS, min(_HEADER_V2.unpack_from(first)[4], MAX_CLUSTER_BITS))
                first = os.pread(self.fd, 1 << cb0, 0)
        except OSError as e:
            raise ImageError(f"cannot read disk image {name}: {e.strerror}") from None
        h = self.header = parse_header(first, file_size, name)
        if not self.read_only:
            if h.nb_snapshots:
                raise ImageError(f"disk image {name} has internal snapshots; pyvirt opens such "
                                 "images read-only only (add ,ro)")
            if h.incompatible & INCOMPAT_CORRUPT:
                raise ImageError(f"disk image {name} is marked corrupt; repair it with "
                                 "`qemu-img check -r all`, or open it read-only (add ,ro)")
            if h.incompatible & INCOMPAT_DIRTY:
                raise ImageError(f"disk image {name} was not closed cleanly (dirty bit); repair it "
                                 "with `qemu-img check -r all`, or open it read-only (add ,ro)")
        self.version = h.version
        self.virtual_size = h.size
        self.size = h.size - h.size % SECTOR
        self.cluster_bits = cb = h.cluster_bits
        self.cluster_size = cs = 1 << cb
        self._l2_bits = cb - 3
        self._l2_mask = (1 << self._l2_bits) - 1
        self._rc_order = h.refcount_order
        self._rc_bits = 1 << h.refcount_order
        self._rc_max = (1 << self._rc_bits) - 1
        self._rbe = cs * 8 >> h.refcount_order                   # counts per refcount block
        self._comp_shift = 62 - (cb - 8)
        self._file_size = file_size                               # grows as we write
        self._open_size = file_size
        self._next_free = -(-file_size // cs)                     # new clusters start here
        # Clusters past the end of the file at opening are valid only where this
        # backend put them: a pointer read from the file into that range is corrupt.
        self._open_clusters = self._next_free
        self._new_data: set[int] = set()
        self._new_meta: set[int] = set()
        # The L1 entries past the disk's end are never used (an image shrunk by qemu-img keeps
        # them): only those the disk needs are read.  Every table held is charged to the chain.
        l1_used = min(h.l1_size, -(-h.size // (cs * (cs // 8))))
        self._charge(l1_used * 8 + h.rt_clusters * cs)
        try:
            self._l1 = self._pread_table(h.l1_offset, l1_used * 8)
            self._rt = self._pread_table(h.rt_offset, h.rt_clusters * cs)
        except OSError as e:
            raise ImageError(f"cannot read disk image {name}: {e.strerror}") from None
        self._rt_offset = h.rt_offset
        # Clusters that hold metadata: in-place data writes must never land on them.
        self._fixed: set[int] = {0}
        self._fixed.update(range(h.rt_offset >> cb, (h.rt_offset >> cb) + h.rt_clusters))
        if h.l1_size:
            self._fixed.update(range(h.l1_offset >> cb, (h.l1_offset + h.l1_size * 8 + cs - 1) >> cb))
        self._charge(len(self._fixed) * _ENTRY_COST)
        self._l2_clusters, self._l2_shared = self._pointed_clusters(self._l1)
        self._rb_clusters, self._rb_shared = self._pointed_clusters(self._rt)
        self._l2_cache: OrderedDict[int, bytearray] = OrderedDict()
        self._rb_cache: OrderedDict[int, bytearray] = OrderedDict()
        self._cache_max = max(16, L2_CACHE_BYTES >> cb)
        self._l2_dirty: set[int] = set()
        self._rb_dirty: set[int] = set()
        self._l2_owned: set[int] = set()
        self._l1_dirty: set[int] = set()
        self._rt_dirty = False
        self._rt_moved = False
        self._frees: list[int] = []
        self._free: list[int] = []             # a heap of clusters known to be free (refcount 0)
        self._in_free: set[int] = set()
        self._scan_next = 1                    # free clusters of the opened file found below this
        self._write_ready = False
        self._broken: str | None = None
        self._nest = 0
        self._comp_cache: tuple[int, bytes] | None = None
        self.backing_file = h.backing_file
        self.backing_format = h.backing_format
        if h.backing_file and open_backing_file:
            ident = (st.st_dev, st.st_ino)
            if ident in chain:
                raise ImageError(f"disk image {name} is its own backing file (a loop in the chain)")
            if len(chain) >= MAX_CHAIN:
                raise ImageError(f"disk image {name}: backing chain deeper than {MAX_CHAIN}")
            path = resolve_backing(self.path, h.backing_file)
            try:
                self.backing = open_backing(path, h.backing_format, chain + (ident,), self._budget)
            except ImageError as e:
                raise ImageError(f"backing file of {name}: {e}") from None

    def _charge(self, nbytes: int) -> None:
        """Count `nbytes` more of tables against the chain's budget; refuse the image past it."""
        b = self._budget
        b.tables += nbytes
        if b.tables > b.table_limit:
            raise ImageError(f"disk image {self.path}: its tables (with its backing chain's) need "
                             f"over {b.table_limit >> 20} MiB of memory, more than pyvirt allows")

    def _pointed_clusters(self, table: bytearray) -> tuple[set[int], set[int]]:
        """Clusters a table's entries point at (well-formed ones inside the file: the others
        are refused when used), and those named twice; charged to the chain's budget as they
        grow.  All-zero stretches (unused entries) are skipped at C speed."""
        seen: set[int] = set()
        twice: set[int] = set()
        low = self.cluster_size - 1                # an offset with these bits is misaligned
        cb = self.cluster_bits
        limit = self._open_clusters
        charged = 0
        step = 1 << 16
        zeros = bytes(step)
        for base in range(0, len(table), step):
            chunk = table[base:base + step]
            if chunk == zeros[:len(chunk)]:
                continue
            entries = array.array("Q", chunk)
            if sys.byteorder == "little":
                entries.byteswap()
            for e in entries:
                off = e & OFFSET_MASK
                if off and not off & low:
                    c = off >> cb
                    if c < limit:
                        (twice if c in seen else seen).add(c)
            grown = len(seen) + len(twice) - charged
            if grown >= 1024:
                self._charge(grown * _ENTRY_COST)
                charged += grown
        self._charge((len(seen) + len(twice) - charged) * _ENTRY_COST)
        return seen, twice

    # -- low-level I/O ------------------------------------------------------------------------
    def _valid_cluster(self, c: int, ours: set[int], whole: bool) -> bool:
        """Whether cluster `c` existed when the image was opened (all of it when
        `whole`), or is one this backend allocated for this use (`ours`)."""
        if c < self._open_clusters:
            return not whole or (c + 1) << self.cluster_bits <= self._open_size
        return c in ours

    def _pread_table(self, offset: int, length: int) -> bytearray:
        """Read a table straight into the bytearray that keeps it (no second copy)."""
        table = bytearray(length)
        view = memoryview(table)
        done = 0
        while done < length:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise self._corrupt(f"metadata at {offset:#x} lies beyond the end of the file")
            done += n
        return table

    def _pread_meta(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise self._corrupt(f"metadata at {offset:#x} lies beyond the end of the file")
        return data

    def _pread_into(self, host: int, views: list[memoryview]) -> None:
        total = sum(len(v) for v in views)
        done = 0
        while done < total:
            n = _preadv(self.fd, advance(views, done) if done else views, host + done)
            if n == 0:                      # past the end of the file: zeros, as a hole
                _zero(advance(views, done))
                return
            done += n

    def _pwrite_all(self, host: int, views: Sequence[Buffer]) -> None:
        if host >= 1 << 56:
            raise OSError(errno.EFBIG, "qcow2 image file full (56-bit offsets)")
        total = sum(memoryview(v).nbytes for v in views)
        done = 0
        while done < total:
            n = _pwritev(self.fd, advance(views, done) if done else views, host + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write to disk image")
            done += n
        self._file_size = max(self._file_size, host + total)

    def _check(self, offset: int, length: int) -> None:
        if self.fd < 0:
            raise OSError(errno.EBADF, "disk image is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"range {offset:#x}+{length:#x} beyond the disk")

    # -- tables -----------------------------------------------------------------------------
    def _meta_pointer(self, off: int, what: str, others: set[int]) -> int:
        """Check a pointer to an L2 table or refcount block; returns its cluster index."""
        cs = self.cluster_size
        if off % cs:
            raise self._corrupt(f"{what} offset {off:#x} is not cluster-aligned")
        c = off >> self.cluster_bits
        if c in self._fixed or c in others:
            raise self._corrupt(f"{what} at {off:#x} overlaps other metadata")
        if not self._valid_cluster(c, self._new_meta, whole=True):
            raise self._corrupt(f"{what} at {off:#x} lies beyond the end of the file")
        return c

    def _l2_offset(self, l1i: int) -> int:
        """The offset of the L2 table for L1 index `l1i`, 0 if none."""
        if l1i * 8 >= len(self._l1):
            raise self._corrupt(f"L1 index {l1i} beyond the L1 table")
        e = _BE64.unpack_from(self._l1, l1i * 8)[0]
        if e & L1_RESERVED:
            raise self._corrupt(f"L1 entry {l1i} has reserved bits set ({e:#x})")
        off = e & OFFSET_MASK
        if off:
            self._meta_pointer(off, "L2 table", self._rb_clusters)
        return off

    def _load(self, cache: OrderedDict[int, bytearray], off: int) -> bytearray:
        t = cache.get(off)
        if t is None:
            t = cache[off] = bytearray(self._pread_meta(off, self.cluster_size))
            if self.read_only:               # nothing dirty: kept within the chain's cache budget
                b = self._budget
                b.cache += self.cluster_size
                while b.cache > b.cache_limit and len(cache) > 1:
                    cache.popitem(last=False)
                    b.cache -= self.cluster_size
        else:
            cache.move_to_end(off)
        return t

    def _l2_entry(self, gc: int) -> int:
        off = self._l2_offset(gc >> self._l2_bits)
        if not off:
            return 0
        return _BE64.unpack_from(self._load(self._l2_cache, off), (gc & self._l2_mask) * 8)[0]

    def _classify(self, e: int) -> tuple[int, int]:
        """(kind, host offset) of an L2 entry; for compressed clusters the descriptor."""
        if e & COMPRESSED:
            if e & COPIED:
                raise self._corrupt(f"compressed L2 entry with the COPIED flag ({e:#x})")
            return _COMP, e
        if e & L2_RESERVED:
            raise self._corrupt(f"L2 entry has reserved bits set ({e:#x})")
        off = e & OFFSET_MASK
        if e & ZERO:
            if self.version < 3:
                raise self._corrupt(f"zero flag in a version 2 image ({e:#x})")
            return _ZERO, off
        if not off:
            if e & COPIED:
                raise self._corrupt(f"L2 entry with the COPIED flag and no offset ({e:#x})")
            return _UNALLOC, 0
        if (off % self.cluster_size or off < self.cluster_size
                or not self._valid_cluster(off >> self.cluster_bits, self._new_data, whole=False)):
            raise self._corrupt(f"data cluster offset {off:#x} is misaligned or outside the file")
        return _DATA, off

    def _compressed_span(self, desc: int) -> tuple[int, int]:
        """(start, end) in the file of a compressed cluster's bytes."""
        start = desc & ((1 << self._comp_shift) - 1)
        sectors = ((desc >> self._comp_shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        end = (start & ~(SECTOR - 1)) + sectors * SECTOR
        if start < self.cluster_size or start >= self._open_size:
            raise self._corrupt(f"compressed cluster at {start:#x} is outside the file")
        return start, end

    def _decompress(self, desc: int) -> bytes:
        if self._comp_cache is not None and self._comp_cache[0] == desc:
            return self._comp_cache[1]
        start, end = self._compressed_span(desc)
        raw = os.pread(self.fd, min(end, self._open_size) - start, start)
        try:
            out = zlib.decompressobj(wbits=-12).decompress(raw, self.cluster_size)
        except zlib.error as e:
            raise self._corrupt(f"compressed cluster at {start:#x} does not inflate ({e})") from None
        if len(out) != self.cluster_size:
            raise self._corrupt(f"compressed cluster at {start:#x} inflates to {len(out)} bytes")
        self._comp_cache = (desc, out)
        return out

    # -- refcounts --------------------------------------------------------------------------
    def _rt_entries(self) -> int:
        return len(self._rt) // 8

    def _refblock(self, rti: int, create: bool) -> bytearray | None:
        e = _BE64.unpack_from(self._rt, rti * 8)[0]
        if e & RT_RESERVED:
            raise self._corrupt(f"refcount table entry {rti} has reserved bits set ({e:#x})")
        if e:
            self._meta_pointer(e, "refcount block", self._l2_clusters)
            return self._load(self._rb_cache, e)
        if not create:
            return None
        r = self._reserve(1)
        block = bytearray(self.cluster_size)
        off = r << self.cluster_bits
        self._rb_cache[off] = block
        self._rb_dirty.add(off)
        self._rb_clusters.add(r)
        self._new_meta.add(r)
        _BE64.pack_into(self._rt, rti * 8, off)
        self._rt_dirty = True
        if r // self._rbe == rti:            # the block counts itself
            self._rc_put(block, r % self._rbe, 1)
        else:
            self._set_refcount(r, 1)
        return block

    def _rc_get(self, block: bytearray, i: int) -> int:
        if self._rc_order >= 3:
            w = self._rc_bits >> 3
            return int.from_bytes(block[i * w:i * w + w], "big")
        per = 8 >> self._rc_order
        return (block[i // per] >> (i % per * self._rc_bits)) & self._rc_max

    def _rc_put(self, block: bytearray, i: int, v: int) -> None:
        if self._rc_order >= 3:
            w = self._rc_bits >> 3
            block[i * w:i * w + w] = v.to_bytes(w, "big")
        else:
            per = 8 >> self._rc_order
            shift = i % per * self._rc_bits
            block[i // per] = (block[i // per] & ~(self._rc_max << shift) & 0xFF) | (v << shift)

    def _get_refcount(self, c: int) -> int:
        rti, i = divmod(c, self._rbe)
        if rti >= self._rt_entries():
            return 0
        block = self._refblock(rti, create=False)
        return 0 if block is None else self._rc_get(block, i)

    def _set_refcount(self, c: int, v: int) -> None:
        if not 0 <= v <= self._rc_max:
            raise self._corrupt(f"refcount of cluster {c} would be {v}")
        self._nest += 1
        try:
            if self._nest > _MAX_NEST:
                raise self._corrupt("refcount blocks cannot be placed")
            rti, i = divmod(c, self._rbe)
            if rti >= self._rt_entries():
                self._grow_refcount_table(rti)
            block = self._refblock(rti, create=True)
            assert block is not None
            off = _BE64.unpack_from(self._rt, rti * 8)[0]
            if off >> self.cluster_bits in self._rb_shared:
                raise self._corrupt(f"refcount block at {off:#x} is named twice")
            self._rc_put(block, i, v)
            self._rb_dirty.add(off)
        finally:
            self._nest -= 1

    def _reserve(self, count: int) -> int:
        """Take `count` contiguous free clusters; their first index.  A single cluster is a
        free one inside the file where one is known (`_find_free`), else -- and always for
        several -- they are taken at the end of the file.

        Clusters past the end can carry refcounts after a crash (leaks); those are skipped."""
        if count == 1:
            while self._free:
                c = heapq.heappop(self._free)
                self._in_free.discard(c)
                if (c < self._next_free and c not in self._fixed and c not in self._l2_clusters
                        and c not in self._rb_clusters and not self._get_refcount(c)):
                    return c
        start = c = self._next_free
        skipped = 0
        while c - start < count:
            if self._get_refcount(c):
                c += 1
                start = c
                skipped += 1
                if skipped > _MAX_FREE_SKIP:
                    raise self._corrupt("refcounts claim too many clusters past the end of the file")
            else:
                c += 1
        if (c << self.cluster_bits) > 1 << 56:
            raise OSError(errno.EFBIG, "qcow2 image file full (56-bit offsets)")
        self._next_free = c
        return start

    def _grow_refcount_table(self, need: int) -> None:
        """Move the refcount table to the end of the file, large enough for index `need`."""
        cs, per = self.cluster_size, self.cluster_size // 8
        n = max(2 * len(self._rt) // cs, -(-(need + 1) // per))
        while True:
            # The new table and the blocks counting it must fall inside what it covers.
            t = self._next_free
            if (t + n + 2 * (n // self._rbe + 2)) < n * per * self._rbe:
                break
            n *= 2
        if n * cs > MAX_RT_BYTES:
            raise OSError(errno.EFBIG, "qcow2 image file too large for its refcount table")
        t = self._reserve(n)
        old_offset, old_n = self._rt_offset, len(self._rt) // cs
        new = bytearray(n * cs)
        new[:len(self._rt)] = self._rt
        self._rt = new
        self._rt_offset = t << self.cluster_bits
        self._rt_dirty = self._rt_moved = True
        self._fixed.update(range(t, t + n))
        for c in range(t, t + n):
            self._set_refcount(c, 1)
        self._frees.extend(range(old_offset >> self.cluster_bits, (old_offset >> self.cluster_bits) + old_n))

    # -- mapping for writes ------------------------------------------------------------------
    def _l2_for_write(self, l1i: int) -> bytearray:
        """The L2 table for `l1i`, ours to change: checked, or newly allocated."""
        off = self._l2_offset(l1i)
        if not off:
            c = self._reserve(1)
            off = c << self.cluster_bits
            self._set_refcount(c, 1)
            self._l2_clusters.add(c)
            self._new_meta.add(c)
            self._l2_cache[off] = bytearray(self.cluster_size)
            self._l2_dirty.add(off)
            self._l2_owned.add(off)
            _BE64.pack_into(self._l1, l1i * 8, off | COPIED)
            self._l1_dirty.add(l1i)
            return self._l2_cache[off]
        if off not in self._l2_owned:
            c = off >> self.cluster_bits
            rc = self._get_refcount(c)
            if rc != 1 or c in self._l2_shared:
                raise self._corrupt(f"L2 table at {off:#x} is shared (refcount {rc})")
            e = _BE64.unpack_from(self._l1, l1i * 8)[0]
            if not e & COPIED:
                _BE64.pack_into(self._l1, l1i * 8, e | COPIED)
                self._l1_dirty.add(l1i)
            self._l2_owned.add(off)
        return self._load(self._l2_cache, off)

    def _set_l2(self, gc: int, entry: int) -> None:
        table = self._l2_for_write(gc >> self._l2_bits)
        _BE64.pack_into(table, (gc & self._l2_mask) * 8, entry)
        self._l2_dirty.add(self._l2_offset(gc >> self._l2_bits))

    def _owned(self, e: int) -> int:
        """The host offset of a standard cluster that can be written in place, else 0."""
        kind, off = self._classify(e)
        if kind != _DATA:
            return 0
        c = off >> self.cluster_bits
        if c in self._fixed or c in self._l2_clusters or c in self._rb_clusters:
            raise self._corrupt(f"data cluster at {off:#x} overlaps metadata")
        rc = self._get_refcount(c)
        if rc == 0:
            raise self._corrupt(f"data cluster at {off:#x} is in use but has refcount 0")
        return off if rc == 1 and e & COPIED else 0

    def _clusters_of(self, e: int) -> list[int]:
        """Host clusters an L2 entry holds a reference on (checked: they can be freed)."""
        kind, off = self._classify(e)
        if kind == _COMP:
            start, end = self._compressed_span(e)
            cs = self.cluster_bits
            clusters = list(range(start >> cs, ((end - 1) >> cs) + 1))
        elif kind in (_DATA, _ZERO) and off:
            if (off % self.cluster_size or off < self.cluster_size
                    or not self._valid_cluster(off >> self.cluster_bits, self._new_data, whole=False)):
                raise self._corrupt(f"cluster offset {off:#x} is misaligned or outside the file")
            clusters = [off >> self.cluster_bits]
        else:
            return []
        for c in clusters:
            if c in self._fixed or c in self._l2_clusters or c in self._rb_clusters:
                raise self._corrupt(f"data cluster {c << self.cluster_bits:#x} overlaps metadata")
            if self._get_refcount(c) == 0:
                raise self._corrupt(f"cluster at {c << self.cluster_bits:#x} is in use but has refcount 0")
        return clusters

    # -- reads -----------------------------------------------------------------------------------
    def readinto(self, offset: int, buf: memoryview) -> int:
        return self.readv(offset, [buf])

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        cur = _Cursor(bufs)
        total = sum(len(b) for b in cur.bufs)
        self._check(offset, total)
        self._trim_caches()
        try:
            self._read(offset, total, cur)
        except ImageCorruptError as e:
            self._broken = self._broken or str(e)
            raise
        return total

    def _read(self, pos: int, total: int, cur: _Cursor) -> None:
        end = pos + total
        cs, cb = self.cluster_size, self.cluster_bits
        while pos < end:
            kind, host = self._classify(self._l2_entry(pos >> cb))
            n = min(cs - (pos & (cs - 1)), end - pos)
            if kind == _UNALLOC and self.backing is None:
                kind = _ZERO
            if kind != _COMP:                  # merge the following clusters of the same kind
                while pos + n < end:
                    k2, h2 = self._classify(self._l2_entry((pos + n) >> cb))
                    if k2 == _UNALLOC and self.backing is None:
                        k2 = _ZERO
                    if k2 != kind or (kind == _DATA and h2 != host + (pos & (cs - 1)) + n):
                        break
                    n += min(cs, end - pos - n)
            views = cur.take(n)
            if kind == _DATA:
                self._pread_into(host + (pos & (cs - 1)), views)
            elif kind == _COMP:
                data = self._decompress(host)
                o = pos & (cs - 1)
                for v in views:
                    v[:] = data[o:o + len(v)]
                    o += len(v)
            elif kind == _UNALLOC:
                inside = max(0, min(n, self.backing.size - pos))
                first, rest = _split(views, inside)
                if first:
                    self.backing.readv(pos, first)
                _zero(rest)
            else:
                _zero(views)
            pos += n

    def _reads_as_zero(self, gc: int) -> bool:
        kind, _ = self._classify(self._l2_entry(gc))
        return kind == _ZERO or (kind == _UNALLOC and (
            self.backing is None or (gc << self.cluster_bits) >= self.backing.size))

    # -- writes -----------------------------------------------------------------------------------
    def write(self, offset: int, data: Buffer) -> int:
        return self.writev(offset, [data])

    def writev(self, offset: int, bufs: Sequence[Buffer]) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        cur = _Cursor(bufs)
        total = sum(len(b) for b in cur.bufs)
        self._check(offset, total)
        self._begin_write()
        try:
            self._write(offset, total, cur)
        except ImageCorruptError as e:
            self._broken = self._broken or str(e)
            raise
        return total

    def _begin_write(self) -> None:
        if self._broken:
            raise ImageCorruptError(self._broken)
        self._trim_caches()
        if not self._write_ready:
            if self.header.autoclear:
                # Unknown (or unsupported: bitmaps) auto-clear features must be
                # cleared before the first change to the image.
                self._pwrite_all(88, [bytes(8)])
                os.fdatasync(self.fd)
                self.header.autoclear = 0
            self._write_ready = True
        if len(self._free) < _FREE_LOW:
            self._find_free()

    def _find_free(self) -> None:
        """Collect the free clusters (refcount 0) of the part of the file that existed at
        opening, a few refcount blocks per request (those freed since are collected by
        `_writeback`).  Only between requests: a cluster taken during one has its refcount
        set before the next."""
        limit = min(self._open_clusters, self._next_free)
        for _ in range(_SCAN_BLOCKS):
            if len(self._free) >= _FREE_LOW or self._scan_next >= limit:
                return
            rti = self._scan_next // self._rbe
            base = rti * self._rbe
            lo, hi = self._scan_next - base, min(self._rbe, limit - base)
            block = self._refblock(rti, create=False) if rti < self._rt_entries() else None
            if block is None:
                zeros: Any = range(lo, hi)
            elif self._rc_order >= 3:
                counts = memoryview(block).cast("BHIQ"[self._rc_order - 3])  # type: ignore[call-overload]   # (0 in any byte order)
                zeros = [i for i in range(lo, hi) if not counts[i]]
            else:
                zeros = [i for i in range(lo, hi) if not self._rc_get(block, i)]
            for i in zeros:
                self._add_free(base + i)
            self._scan_next = base + hi

    def _add_free(self, c: int) -> None:
        if c not in self._in_free and c not in self._fixed and c not in self._l2_clusters \
                and c not in self._rb_clusters:
            self._in_free.add(c)
            heapq.heappush(self._free, c)

    def _write(self, pos: int, total: int, cur: _Cursor) -> None:
        end = pos + total
        cs, cb = self.cluster_size, self.cluster_bits
        while pos < end:
            gc = pos >> cb
            n = min(cs - (pos & (cs - 1)), end - pos)
            host = self._owned(self._l2_entry(gc))
            if host:                           # in place, merged with contiguous owned clusters
                while pos + n < end and n < (8 << 20):
                    h2 = self._owned(self._l2_entry((pos + n) >> cb))
                    if h2 != host + (pos & (cs - 1)) + n:
                        break
                    n += min(cs, end - pos - n)
                self._pwrite_all(host + (pos & (cs - 1)), cur.take(n))
            else:
                count = 1
                while pos + n < end and count < 256 and not self._owned(self._l2_entry(gc + count)):
                    n += min(cs, end - pos - n)
                    count += 1
                self._write_new(pos, n, gc, count, cur)
            pos += n

    def _write_new(self, pos: int, n: int, gc0: int, count: int, cur: _Cursor) -> None:
        """Write [pos, pos+n) (guest clusters gc0..gc0+count-1) into new clusters."""
        cs, cb = self.cluster_size, self.cluster_bits
        old = [self._l2_entry(gc0 + i) for i in range(count)]
        frees = [self._clusters_of(e) for e in old]         # checked before anything changes
        pieces_of: list[list[Buffer]] = []
        end = pos + n
        for i in range(count):
            start = (gc0 + i) << cb
            lo, hi = max(pos, start), min(end, start + cs)
            if lo == start and hi == start + cs:
                pieces_of.append(list(cur.take(cs)))
            else:                                            # copy-on-write: the old contents around
                buf = bytearray(cs)
                valid = min(cs, self.size - start)
                self._read(start, valid, _Cursor([memoryview(buf)[:valid]]))
                o = lo - start
                for v in cur.take(hi - lo):
                    buf[o:o + len(v)] = v
                    o += len(v)
                pieces_of.append([buf])
        hosts = [self._reserve(1) for _ in range(count)]     # free clusters first, then the end
        self._new_data.update(hosts)
        i = 0
        while i < count:                                      # contiguous runs: one pwritev each
            j = i + 1
            while j < count and hosts[j] == hosts[j - 1] + 1:
                j += 1
            self._pwrite_all(hosts[i] << cb, [v for p in pieces_of[i:j] for v in p])
            i = j
        for i in range(count):
            self._set_refcount(hosts[i], 1)
            self._set_l2(gc0 + i, (hosts[i] << cb) | COPIED)
            self._frees.extend(frees[i])
        self._comp_cache = None

    # -- discard -------------------------------------------------------------------------------------
    def discard(self, offset: int, length: int) -> None:
        """Deallocate whole clusters (zero flag where a backing file would show through),
        write zeros over partial ones; the range then reads as zeros."""
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        self._check(offset, length)
        if length == 0:
            return
        self._begin_write()
        try:
            self._discard(offset, length)
        except ImageCorruptError as e:
            self._broken = self._broken or str(e)
            raise

    def write_zeroes(self, offset: int, length: int) -> None:
        """virtio-blk WRITE_ZEROES: the same as `discard`, whose range reads as zeros after;
        whole clusters take no space rather than being filled with zeros."""
        self.discard(offset, length)

    def _discard(self, pos: int, length: int) -> None:
        end = pos + length
        cs, cb = self.cluster_size, self.cluster_bits
        while pos < end:
            gc = pos >> cb
            n = min(cs - (pos & (cs - 1)), end - pos)
            whole = (pos & (cs - 1)) == 0 and (n == cs or pos + n >= self.size)
            if whole and (self.backing is None or self.version >= 3):
                e = self._l2_entry(gc)
                new = ZERO if self.backing is not None else 0
                if e != new and (e or new):
                    frees = self._clusters_of(e)
                    self._set_l2(gc, new)
                    self._frees.extend(frees)
            elif not self._reads_as_zero(gc):
                self._write(pos, n, _Cursor([bytes(n)]))
            pos += n
        self._comp_cache = None

    # -- write-back ---------------------------------------------------------------------------------
    def _dirty(self) -> bool:
        return bool(self._rb_dirty or self._rt_dirty or self._l2_dirty or self._l1_dirty or self._frees)

    def _writeback(self) -> None:
        """Write changed metadata in crash-safe order (see the module's notes)."""
        if self.read_only or self.fd < 0 or not self._dirty():
            return
        fd, cs = self.fd, self.cluster_size
        # 1-2: refcounts, durable together with all data written so far; new refcount
        # blocks before the refcount table entries that name them.
        self._write_refblocks()
        if self._rt_dirty:
            os.fdatasync(fd)
            self._pwrite_all(self._rt_offset, [self._rt])
            self._rt_dirty = False
        os.fdatasync(fd)
        if self._rt_moved:
            self._pwrite_all(48, [struct.pack(">QI", self._rt_offset, len(self._rt) // cs)])
            os.fdatasync(fd)
            self._rt_moved = False
        # 3: L2 tables, then the L1 entries naming new ones.
        for off in sorted(self._l2_dirty):
            self._pwrite_all(off, [self._l2_cache[off]])
        self._l2_dirty.clear()
        if self._l1_dirty:
            os.fdatasync(fd)
            for i in sorted(self._l1_dirty):
                self._pwrite_all(self.header.l1_offset + i * 8, [self._l1[i * 8:i * 8 + 8]])
            self._l1_dirty.clear()
        os.fdatasync(fd)
        # 4: nothing names the freed clusters any more.
        frees, self._frees = self._frees, []
        released: list[int] = []
        for c in frees:
            rc = self._get_refcount(c)
            if rc == 0:
                self._broken = f"disk image {self.path} is corrupt: freeing cluster {c} twice"
                raise ImageCorruptError(self._broken)
            self._set_refcount(c, rc - 1)
            if rc == 1:
                released.append(c)
        self._write_refblocks()
        # 5: the released clusters are free: their space goes back to the host, and they are
        # used again (nothing durable names them since step 3).  Free clusters at the end of
        # the file are cut off, once their zero refcounts are durable.
        self._release(released)

    def _release(self, released: list[int]) -> None:
        cb = self.cluster_bits
        released.sort()
        i = 0
        while i < len(released):
            j = i + 1
            while j < len(released) and released[j] == released[j - 1] + 1:
                j += 1
            try:
                _punch(self.fd, released[i] << cb, (j - i) << cb)
            except OSError:
                pass
            i = j
        for c in released:
            self._fixed.discard(c)             # (an old refcount table's clusters)
            self._add_free(c)
        top = self._next_free
        while top > 1 and top - 1 not in self._fixed and top - 1 not in self._l2_clusters \
                and top - 1 not in self._rb_clusters and not self._get_refcount(top - 1):
            top -= 1
        if top < self._next_free and top << cb < self._file_size:
            os.fdatasync(self.fd)
            os.ftruncate(self.fd, top << cb)
            self._next_free = top
            self._file_size = top << cb
            self._open_clusters = min(self._open_clusters, top)
            self._open_size = min(self._open_size, top << cb)
            self._free = [c for c in self._free if c < top]
            heapq.heapify(self._free)
            self._in_free = set(self._free)

    def _write_refblocks(self) -> None:
        for off in sorted(self._rb_dirty):
            self._pwrite_all(off, [self._rb_cache[off]])
        self._rb_dirty.clear()

    def _trim_caches(self) -> None:
        """Keep the table caches bounded; tables are only dropped between requests."""
        if len(self._l2_cache) <= self._cache_max and len(self._rb_cache) <= self._cache_max:
            return
        self._writeback()
        for cache in (self._l2_cache, self._rb_cache):
            while len(cache) > self._cache_max // 2:
                cache.popitem(last=False)
                if self.read_only:
                    self._budget.cache -= self.cluster_size

    def flush(self) -> None:
        """Write back metadata in crash-safe order and make everything durable."""
        if self.fd < 0 or self.read_only:
            return
        if self._broken:
            raise ImageCorruptError(self._broken)
        self._writeback()
        os.fdatasync(self.fd)

    # -- lifetime and state ----------------------------------------------------------------------
    def _close_files(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.fd >= 0:
            os.close(self.fd)             # closing the descriptor drops the flock
            self.fd = -1

    def close(self) -> None:
        """Write back metadata, release the lock and the files (the backing chain too); idempotent."""
        if self.fd < 0:
            return
        try:
            if not self.read_only:
                self._writeback()
                os.fdatasync(self.fd)
        finally:
            self._close_files()

    def save(self) -> dict[str, Any]:
        """Metadata is written back first, so the file alone holds the disk."""
        self._writeback()
        return {"path": str(self.path), "size": self.size, "read_only": self.read_only,
                "format": "qcow2"}

    def load(self, state: dict[str, Any]) -> None:
        if state.get("size", self.size) != self.size:
            raise ImageError(f"disk image {self.path} is {self.size} bytes, "
                             f"the snapshot expects {state['size']}")
