"""A persistent cache of native translations, so that a second boot skips translating.

Translating a block to x86-64 is a pure function of the block's guest bytes, the page
offset of its pc (block formation never leaves the entry's page), the privilege it runs
at and the translator itself; native code reaches everything else (registers, TLB
tables, guest RAM) through the state buffer, its pc constants (exit targets, links,
auipc) are the entry pc it finds there plus a distance (native._BlockGen._mov_pc), and
its only absolute targets are the far jumps to its code chunk's stub, which
`CodeBuffer.put` patches where the code lands.  So a translation made in one run can be
placed as is in another, at any virtual page.

That is what makes an entry worth keeping in a system with address-space randomisation:
each process maps its libraries (and a position-independent program) at new addresses,
and every `exec` would translate libc again.  An entry is therefore keyed by content,
(privilege, page offset, the entry instruction's bytes), and holds:

* the pc it was made at (for reading the file; the code does not depend on it);
* the *footprint*: every guest byte the block was formed from, as (page offset, bytes)
  runs — the instructions decoded (direct jumps inside the page included) and the half
  word that stopped decoding at the page's end;
* `cut`, the number of instructions the native code covers;
* the code bytes and the offsets of their far jumps.

A lookup hits only when every footprint byte equals the guest page's bytes now, so a
changed page (self-modifying code, another program there, a remapped page) misses and is
translated afresh; invalidation on later stores is the engine's as always.  Nothing else
of the guest is trusted, and the guest decides only which of its own blocks are stored:
translating the same bytes would give the same code.  Entries a run makes are found by
that run too (from its spool file), so the second process to map a library places the
first one's code.

The files (one per translator version, the digest of this package's source, and kernel:
see `for_board`) live in the cache directory the board names (~/.cache/pyvirt/code),
mode 0700.  A run writes its new entries to a file of its own as it makes them, then the
older entries, and renames it over the old file; the file carries a keyed BLAKE2b MAC
under a random key kept in that directory (0600): a file that fails the MAC, is
truncated, too large or malformed is ignored.  A file is bounded (`MAX_FILE`; a run's
new entries take at most half), entries used or made by the run go first and the rest
are kept while they fit; at most `KEEP_FILES` files stay in the directory.  Write errors
(a read-only or jailed file system) only mean the next run translates again.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import platform
import secrets
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from pyvirt.cpu.riscv.decode import Insn
from pyvirt.cpu.riscv.native import far_jump_fits
from pyvirt.fsutil import open_regular

MAGIC = b"PYVCODE2"
MAX_FILE = 256 << 20           # bytes in one cache file (a systemd boot with its user space: ~120 MB)
KEEP_FILES = 4                 # files (translator versions x kernels) kept side by side
MAX_CANDIDATES = 16            # entries kept per key: blocks with the same first instruction
KEY_BYTES = 32
SAVE_FRACTION = 100            # rewrite a loaded file only for 1/100 of its entries new or more
MIN_NEW = 64                   # ... and never for fewer new entries than this (a tiny test guest
                               # would otherwise push a real kernel's file out of the directory)
_HEAD = struct.Struct("<8s32sIQ32s")          # magic, translator digest, entries, body length, MAC
_REC = struct.Struct("<QQBBHIH")              # pc, lead, priv, runs, cut, code length, far jumps
_RUN = struct.Struct("<HH")                   # page offset, length


def for_board(root: Path, kernel: Path | None) -> CodeCache | None:
    """The code cache under cache directory `root` for a board booting `kernel`, unless
    $PYVIRT_CODE_CACHE is "off".  Each kernel (by content) has a file of its own, so that
    a small guest does not load a large one's entries; the label only sorts entries into
    files: what is used is checked against the guest's bytes."""
    if os.environ.get("PYVIRT_CODE_CACHE", "on").lower() in ("off", "0", "no"):
        return None
    label = "none"
    if kernel is not None:
        try:
            # By content (the board reads the whole file anyway): the same kernel at another
            # path -- the image build's scratch copy of Debian's, a copied image -- shares it.
            # A FIFO or a device named as the kernel is refused by the loader (boot.read_file).
            with open_regular(kernel) as f:
                h = hashlib.blake2b(digest_size=6)
                left = os.fstat(f.fileno()).st_size      # (no more than it had when opened)
                while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                    h.update(chunk)
                    left -= len(chunk)
                label = h.hexdigest()
        except OSError:
            pass
    return CodeCache(root / "code", label)


def translator_digest() -> bytes:
    """SHA-256 of the CPU package's source and the host's architecture: any change to the
    decoder, block formation or the translator makes a new cache file.  (The translator
    emits baseline x86-64 only, whatever the host CPU: nothing else of the host shapes it.)"""
    h = hashlib.sha256(MAGIC + platform.machine().encode() + b"\0")
    here = Path(__file__).resolve().parent
    for p in sorted(here.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.digest()


_DIGEST: bytes | None = None


def _digest() -> bytes:
    global _DIGEST
    if _DIGEST is None:
        _DIGEST = translator_digest()
    return _DIGEST


def footprint(insns: Sequence[tuple[Insn, int]], stop_half: int | None) -> tuple[tuple[int, int], ...]:
    """The page-offset runs (offset, length) a decoded block was read from; `stop_half` is
    the page offset of a half word read that ended decoding (an instruction that would
    cross into the next page), else None."""
    # Decoding reads forward and jumps around only by direct jumps, so adjacent
    # instructions make one run; runs may come in any order (and, for odd code, overlap:
    # each is checked on its own).
    runs: list[tuple[int, int]] = []
    start = end = -1
    for ins, pc in insns:
        off = pc & 0xFFF
        if off != end:
            if end >= 0:
                runs.append((start, end - start))
            start = end = off
        end += ins.length
    if stop_half is not None and stop_half != end:
        runs.append((start, end - start))
        start = end = stop_half
    if stop_half is not None:
        end += 2
    if end >= 0:
        runs.append((start, end - start))
    return tuple(runs)


def _lead(page: memoryview | bytes | bytearray, off: int) -> int:
    """The entry instruction's bytes at page offset `off` (2 or 4: always part of the
    footprint), as the key's integer."""
    return int.from_bytes(page[off:off + (4 if page[off] & 3 == 3 else 2)], "little")


def _key(lead: int, off: int, priv: int) -> int:
    return lead << 14 | off << 2 | priv


class CodeCache:
    """The cache file of one translator version in `directory`, loaded at construction."""

    def __init__(self, directory: Path, label: str = "none", max_file: int = MAX_FILE) -> None:
        """`label`: which file of the directory (see for_board), [0-9a-z] only."""
        if not label.isalnum() or not label.isascii() or len(label) > 32:
            raise ValueError(f"bad code cache label {label!r}")
        self.dir = Path(directory)
        self.max_file = max_file
        self.digest = _digest()
        self.path = self.dir / f"native-{self.digest[:8].hex()}-{label}.bin"
        self.stats = {"loaded": 0, "hits": 0, "misses": 0, "stored": 0, "rejected": 0}
        self._blob: bytes | mmap.mmap = b""
        # _key(...) -> offset of its record in the file (a tuple when there are several);
        # records this run made are in it too, as -1 - (offset in the spool)
        self._index: dict[int, int | tuple[int, ...]] = {}
        self._used: set[int] = set()           # offsets of loaded records this run hit
        self._spool: BinaryIO | None = None    # this run's new file (see _open_spool)
        self._spool_path = Path()
        self._spool_mac: Any = None
        self._spool_count = self._spool_bytes = 0
        self._pending = bytearray()             # records not yet written (written by the MiB)
        self._key = self._read_key()
        if self._key is not None:
            self._load()
            self._open_spool()

    # -- the key ---------------------------------------------------------------------------
    def _read_key(self) -> bytes | None:
        """The MAC key, made on first use; None (no cache) if it cannot be had safely."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.dir)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                return None
            path = self.dir / "key"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(KEY_BYTES))
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                key = f.read(KEY_BYTES + 1)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                return None
            return key if len(key) == KEY_BYTES else None
        except OSError:
            return None

    def _mac(self, head: bytes, body: bytes | memoryview) -> bytes:
        """MAC of the body, then the header without its MAC field (the order it is written)."""
        assert self._key is not None
        h = hashlib.blake2b(key=self._key, digest_size=32)
        h.update(body)
        h.update(head)
        return h.digest()

    # -- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return
            if not _HEAD.size <= st.st_size <= self.max_file:
                self.stats["rejected"] += 1
                return
            try:
                # Mapped, not read: the pages are the page cache's, shared by every VM
                # booting this kernel (clones, a fleet), instead of 64 MiB of private
                # memory each.  Files are only ever replaced by rename, never rewritten.
                data = mmap.mmap(f.fileno(), st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
            except (OSError, ValueError):
                return
        if not self._parse(data):
            self.stats["rejected"] += 1
            self._index.clear()
            with contextlib.suppress(BufferError):
                data.close()
            return
        # The MAC read every page; let them go from this process (they stay cached) so
        # that its resident set holds only the entries it uses.
        with contextlib.suppress(OSError, AttributeError):
            data.madvise(mmap.MADV_DONTNEED)

    def _parse(self, data: bytes | mmap.mmap) -> bool:
        if len(data) > self.max_file or len(data) < _HEAD.size:
            return False
        magic, digest, count, length, mac = _HEAD.unpack_from(data)
        if magic != MAGIC or digest != self.digest or length != len(data) - _HEAD.size:
            return False
        body = memoryview(data)[_HEAD.size:]
        if not secrets.compare_digest(mac, self._mac(data[:_HEAD.size - 32], body)):
            return False
        # The MAC says this run's translator wrote it; the bounds are checked all the same.
        at, end = _HEAD.size, len(data)
        for _ in range(count):
            if at + _REC.size > end:
                return False
            pc, lead, priv, nruns, cut, ncode, nfar = _REC.unpack_from(data, at)
            size = _REC.size + nruns * _RUN.size + 4 * nfar + ncode
            runs_at = at + _REC.size
            if priv not in (0, 1, 3) or nruns == 0 or cut == 0 or ncode == 0 or at + size > end:
                return False
            total = 0
            for i in range(nruns):
                off, n = _RUN.unpack_from(data, runs_at + i * _RUN.size)
                if n == 0 or off + n > 4096:
                    return False
                total += n
            size += total
            if at + size > end:
                return False
            self._add(_key(lead, pc & 0xFFF, priv), at)
            at += size
        if at != end:
            return False
        self._blob = data
        self.stats["loaded"] = count
        return True

    # -- use -------------------------------------------------------------------------------
    def _add(self, k: int, at: int) -> None:
        cands = self._index.get(k)
        if cands is None:
            self._index[k] = at
        elif isinstance(cands, int):
            self._index[k] = (cands, at)
        elif len(cands) < MAX_CANDIDATES:
            self._index[k] = (*cands, at)

    def _record(self, at: int) -> tuple[bytes | mmap.mmap | bytearray, int]:
        """(buffer, offset) of the record `at` names: in the loaded file, or this run's
        spool (written, or still pending)."""
        if at >= 0:
            return self._blob, at
        at = -1 - at
        written = self._spool_bytes - len(self._pending)     # (header excluded: see store)
        if at >= written:
            return self._pending, at - written
        assert self._spool is not None
        fd = self._spool.fileno()
        head = os.pread(fd, _REC.size, _HEAD.size + at)
        _pc, _lead, _priv, nruns, _cut, ncode, nfar = _REC.unpack(head)
        runs = struct.unpack(f"<{2 * nruns}H", os.pread(fd, nruns * _RUN.size, _HEAD.size + at + _REC.size))
        size = _REC.size + nruns * _RUN.size + sum(runs[1::2]) + 4 * nfar + ncode
        return os.pread(fd, size, _HEAD.size + at), 0

    def lookup(self, priv: int, pc: int, page: memoryview | bytes | bytearray
               ) -> tuple[bytes, list[int], int] | None:
        """(code, far-jump offsets, cut) of an entry for a block at `pc` (or at the same
        page offset of any other page) whose footprint matches `page` (the 4 KiB physical
        page the block is fetched from), else None."""
        off = pc & 0xFFF
        cands = self._index.get(_key(_lead(page, off), off, priv))
        if cands is not None:
            for at in (cands,) if isinstance(cands, int) else cands:
                try:
                    data, p = self._record(at)
                except OSError:
                    continue
                _made_at, _lead_, _priv, nruns, cut, ncode, nfar = _REC.unpack_from(data, p)
                p += _REC.size
                q = p + nruns * _RUN.size
                for i in range(nruns):
                    o, n = _RUN.unpack_from(data, p + 4 * i)
                    if page[o:o + n] != data[q:q + n]:
                        break
                    q += n
                else:
                    far = list(struct.unpack_from(f"<{nfar}I", data, q))
                    q += 4 * nfar
                    code = bytes(data[q:q + ncode])
                    if len(code) != ncode or any(not far_jump_fits(o, ncode) for o in far):
                        continue                      # (a short read of the spool)
                    if at >= 0:
                        self._used.add(at)
                    self.stats["hits"] += 1
                    return code, far, cut
        self.stats["misses"] += 1
        return None

    def store(self, priv: int, pc: int, runs: tuple[tuple[int, int], ...],
              page: memoryview | bytes | bytearray, code: bytes, far: Sequence[int], cut: int) -> None:
        """Record a translation made this run from `page`'s bytes at `runs` (found by
        this run's later lookups too)."""
        if (self._spool is None or self._spool_bytes >= self.max_file // 2
                or cut > 0xFFFF or len(far) > 0xFFFF):
            return
        size = (_REC.size + _RUN.size * len(runs) + sum(n for _, n in runs)
                + 4 * len(far) + len(code))
        if self._spool_bytes + size > self.max_file - _HEAD.size:
            return
        buf = self._pending
        off = pc & 0xFFF
        lead = _lead(page, off)
        self._add(_key(lead, off, priv), -1 - self._spool_bytes)
        buf += _REC.pack(pc, lead, priv, len(runs), cut, len(code), len(far))
        for o, n in runs:
            buf += _RUN.pack(o, n)
        for o, n in runs:
            buf += page[o:o + n]
        buf += struct.pack(f"<{len(far)}I", *far)
        buf += code
        self._spool_count += 1
        self._spool_bytes += size
        if len(buf) >= 1 << 20:
            try:
                self._write_pending()
            except OSError:                         # (a full disk: no cache this time)
                self._spool = None
                return
        self.stats["stored"] += 1

    def _size(self, at: int) -> int:
        """The length of the (loaded, checked) record at offset `at`."""
        _pc, _lead, _priv, nruns, _cut, ncode, nfar = _REC.unpack_from(self._blob, at)
        runs = struct.unpack_from(f"<{2 * nruns}H", self._blob, at + _REC.size)
        return _REC.size + nruns * _RUN.size + sum(runs[1::2]) + 4 * nfar + ncode

    # -- saving ----------------------------------------------------------------------------
    def _open_spool(self) -> None:
        """The file this run's records go to as they are made (so they need no memory), under
        a temporary name; `save` completes it and renames it over the cache file.  Opened
        with the board, before any jail."""
        self._drop_stale()
        tmp = self.dir / f".native-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            self._key = None
            return
        self._spool = os.fdopen(fd, "wb", buffering=0)
        self._spool_path = tmp
        self._spool.write(bytes(_HEAD.size))          # the header, written last
        assert self._key is not None
        self._spool_mac = hashlib.blake2b(key=self._key, digest_size=32)

    def _drop_stale(self) -> None:
        """Remove temporary files of runs that ended without saving (killed)."""
        with contextlib.suppress(OSError):
            for p in self.dir.glob(".native-*.tmp"):
                pid = p.name.split("-")[1]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    p.unlink()

    def _put(self, rec: bytes | bytearray | memoryview) -> None:
        self._pending += rec
        self._spool_count += 1
        self._spool_bytes += len(rec)
        if len(self._pending) >= 1 << 20:
            self._write_pending()

    def _write_pending(self) -> None:
        assert self._spool is not None and self._spool_mac is not None
        self._spool.write(self._pending)
        self._spool_mac.update(self._pending)
        self._pending.clear()

    def save(self) -> bool:
        """Complete the file: what this run made, then the loaded entries it used, then the
        others while they fit; rename it over the cache file.  False if there was too
        little new (a boot that found nearly all its blocks: the few it did not are not
        worth rewriting the file) or it could not be written."""
        spool, self._spool = self._spool, None
        if spool is None:
            return False
        try:
            if self.stats["stored"] < max(MIN_NEW, self.stats["loaded"] // SAVE_FRACTION):
                return False
            self._spool = spool
            blob = memoryview(self._blob)
            old = sorted(at for cands in self._index.values()
                         for at in ((cands,) if isinstance(cands, int) else cands)
                         if at >= 0 and at not in self._used)
            for at in (*sorted(self._used), *old):
                size = self._size(at)
                if self._spool_bytes + size > self.max_file - _HEAD.size:
                    break
                self._put(blob[at:at + size])
            self._write_pending()
            self._spool = None
            assert self._spool_mac is not None
            head = _HEAD.pack(MAGIC, self.digest, self._spool_count, self._spool_bytes, bytes(32))[:-32]
            self._spool_mac.update(head)
            os.pwrite(spool.fileno(), head + self._spool_mac.digest(), 0)
            os.replace(self._spool_path, self.path)
        except OSError:
            # (e.g. a jailed runner may write the open file but not rename in the directory:
            # leave no data behind; the name goes when the next board finds it stale)
            with contextlib.suppress(OSError):
                os.ftruncate(spool.fileno(), 0)
            return False
        finally:
            self._spool = None
            with contextlib.suppress(OSError):
                spool.close()
            with contextlib.suppress(OSError):
                os.unlink(self._spool_path)       # (gone already when renamed)
        self._prune()
        return True

    def _prune(self) -> None:
        """Keep the KEEP_FILES most recently written files."""
        try:
            files = sorted(self.dir.glob("native-*.bin"), key=lambda p: p.stat().st_mtime, reverse=True)
            for p in files[KEEP_FILES:]:
                p.unlink()
        except OSError:
            pass
