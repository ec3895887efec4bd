"""Pre-copy live migration of one running VM over a connected stream socket (docs/migration.md).

The stream is a sequence of frames, each `type (1 byte) | length (4 bytes, big-endian) |
payload`, in this order from the source::

    HELLO     JSON {"protocol": "pyvirt-migration", "version": 1, "token": ...}   -> OK / ERROR
    SPEC      JSON: the VmSpec                                                     -> OK / ERROR
    CODE      zstd: u32 count, count (u64 pc, u32 physical page, u8 privilege): the blocks
              the source has translated, for the destination to translate (or take from its
              code cache) as their pages arrive, while the guest still runs at the source
    PAGES*    zstd: u32 count, count u32 page indexes, count pages of 4 KiB  (any number, no reply)
    SYNC      (empty, at the end of each round)         -> OK (once everything before it is in)
    BLOCKS*   zstd: u8 disk, u32 count, count (u64 block, u8 zero), the data blocks  (disk copy)
    STATE     zstd: the machine's state (board.save_state, JSON)
    COMPLETE  (empty)                                            -> READY (state loaded) / ERROR
    GO        (empty): the destination runs the VM; the source has ended it
    ABANDON   (empty, at any point): the destination drops everything it received

The destination answers with OK, READY or ERROR (a one-line reason, UTF-8).  Every frame a
peer sends is checked (type expected now, length bounded, page indexes inside RAM,
decompressed sizes bounded, the state checked against the machine's schema as a snapshot's
is); a bad one ends the migration with one line, the source VM running on unchanged.

The source side (`Migration`) runs between the VM's slices (a `Watch`'s tick): the first
round finds and sends every non-zero page while the guest runs, each later round what the
dirty-page log (memory.py) says was written since; when what is left would go in less than
the downtime target at the measured bandwidth, the last pages, the state and COMPLETE go in
one tick -- the guest does not run meanwhile, its clock stopped -- and on READY the source
sends GO and ends its run.  Until then the sender never blocks the guest for longer than its
share of a tick: RAM is scanned for non-zero pages a chunk at a time, and frames go through
a queue that takes what the socket accepts without waiting (a destination still building
its board, or translating, does not stall the guest at the source).

The destination's guest must not spend its first slices translating its whole working set
(thousands of blocks: a tenth of a second and more, which the guest sees as a gap): the
source names the blocks it has translated (CODE), and the destination translates each page's
blocks as that page arrives, during pre-copy -- from its own RAM's bytes, so nothing of the
source's code is trusted; a page sent again drops its blocks, as any write does -- and keeps
them when it loads the state.  Its clock stays stopped from the state's load until the VM
runs (`Vm.run`).
A guest that writes faster than the link gets fewer instructions per second in steps
(auto-converge: each tick then also spends a share of time sending, or waiting).

Disks are on shared storage (the destination opens the same paths), or -- `copy_storage`,
libvirt's --copy-storage-all -- copied in the same stream: the greeting declares each disk
(format, size, bytes allocated), the destination makes a new image of that format and size
in a directory of its own choosing (`disk_dir`; names it makes itself), the first round
sends every non-zero block of what the guest sees (a qcow2 backing chain arrives flattened
into one image), later rounds the blocks a dirty-block bitmap (backends/dirty.py) saw
written, the last round during the pause.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from pyvirt.backends.char import CharBackend
from pyvirt.backends.dirty import BLOCK, TrackedBackend
from pyvirt.errors import PyvirtError
from pyvirt.memory import PAGE_SIZE, RAM_TAIL, anonymous_ram
from pyvirt.spec import VmSpec
from pyvirt.state import encode_bytes

PROTOCOL = "pyvirt-migration"
VERSION = 3                     # 2: disk copy (BLOCKS, the greeting's "disks"); 3: CODE, SYNC
(HELLO, SPEC, PAGES, STATE, COMPLETE, GO, ABANDON, OK, READY, ERROR, BLOCKS, CODE, SYNC) = range(1, 14)
NAMES = {HELLO: "HELLO", SPEC: "SPEC", PAGES: "PAGES", STATE: "STATE", COMPLETE: "COMPLETE", GO: "GO",
         ABANDON: "ABANDON", OK: "OK", READY: "READY", ERROR: "ERROR", BLOCKS: "BLOCKS", CODE: "CODE",
         SYNC: "SYNC"}
HEADER = struct.Struct(">BI")
PAGES_PER_FRAME = 64
MAX_FRAME = 4 << 20             # a compressed frame; more is a bad stream
MAX_PAGES_RAW = 4 + PAGES_PER_FRAME * (4 + PAGE_SIZE)
MAX_STATE = 64 << 20            # as a snapshot's state.json
MAX_HELLO = 64 << 10
BLOCKS_PER_FRAME = 16
MAX_BLOCKS_RAW = 5 + BLOCKS_PER_FRAME * (9 + BLOCK)
MAX_DISKS = 16                  # disks a copy may declare
MAX_CODE = 1 << 16              # blocks a CODE frame may name (the source's newest)
_CODE_ENTRY = struct.Struct("<QIB")
MAX_CODE_RAW = 4 + MAX_CODE * _CODE_ENTRY.size
SCAN_CHUNK = 2 << 20            # RAM compared with zeros at a time (a few ms)
SCAN_MAPPED = 32 << 20          # ... or looked up in the page table (Bus.touched_pages)
MAX_SEND_TICK = 0.02            # the longest one tick sends (a sender behind is not paid back at once)
OUT_HIGH = 1 << 20              # bytes queued for the socket before the sender stops encoding
MAX_DISK_COPY = 1 << 40         # bytes, one disk copied
SPACE_RESERVE = 64 << 20        # a copy leaves this much of the destination's file system free
DEFAULT_DOWNTIME = 0.3
DEFAULT_TIMEOUT = 600.0
SENDER_SHARE = 0.25            # of the run loop's time, the sender's (one thread for guest and sender)
MAX_TICK = 0.05                # the longest a throttled tick waits
THROTTLE_STEPS = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95)   # auto-converge: the cut of the guest's share, step by step
_CHUNK = 2 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_BLOCK = bytes(BLOCK)


class MigrationError(PyvirtError):
    """A migration failed (one line); the source VM runs on."""


# -- frames ----------------------------------------------------------------------------------------
def send_frame(sock: socket.socket, kind: int, payload: bytes = b"") -> int:
    sock.sendall(HEADER.pack(kind, len(payload)) + payload)
    return HEADER.size + len(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            got = sock.recv(min(n - len(buf), 1 << 20))
        except TimeoutError:
            raise MigrationError("migration peer stopped answering") from None
        except OSError as e:
            raise MigrationError(f"migration connection failed: {e.strerror or e}") from None
        if not got:
            raise MigrationError("migration connection closed by the peer" if not buf
                                 else "migration stream truncated")
        buf += got
    return bytes(buf)


def recv_frame(sock: socket.socket, expect: tuple[int, ...], limit: int = MAX_FRAME) -> tuple[int, bytes]:
    kind, length = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if kind == ERROR and ERROR not in expect:
        reason = _recv_exact(sock, min(length, 1024)).decode("utf-8", "replace").splitlines()
        raise MigrationError(f"the destination refused: {reason[0] if reason else 'no reason given'}")
    if kind not in expect:
        raise MigrationError(f"bad migration stream: frame type {kind} where "
                             f"{'/'.join(NAMES[k] for k in expect)} was expected")
    if length > limit:
        raise MigrationError(f"bad migration stream: a {NAMES[kind]} frame of {length} bytes")
    return kind, _recv_exact(sock, length)


def _decompress(data: bytes, limit: int, what: str) -> bytes:
    """A frame's zstd body, at most `limit` bytes once inflated.  (A zstd frame that declares
    its content size gets a buffer of that size from zstandard's decompress(), whatever
    max_output_size says: the declared size is checked first, or a hostile peer names
    terabytes and the allocation is the attack.)"""
    try:
        declared = zstandard.frame_content_size(data)       # (-1: not declared)
        if declared > limit:
            raise MigrationError(f"bad migration stream: {what} declares {declared} bytes, "
                                 f"over its limit of {limit}")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise MigrationError(f"bad migration stream: {what}: {e}") from None
    except MemoryError:
        raise MigrationError(f"bad migration stream: {what} too large") from None
    if len(out) > limit:
        raise MigrationError(f"bad migration stream: {what} too large")
    return out


def encode_pages(ram: mmap.mmap, pages: list[int], cctx: zstandard.ZstdCompressor) -> bytes:
    body = bytearray(struct.pack(f"<I{len(pages)}I", len(pages), *pages))
    for p in pages:
        body += ram[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
    return cctx.compress(bytes(body))


def apply_pages(ram: mmap.mmap, npages: int, payload: bytes) -> tuple[int, ...]:
    """Write a PAGES frame's pages into `ram`; returns their indexes."""
    raw = _decompress(payload, MAX_PAGES_RAW, "pages")
    if len(raw) < 4:
        raise MigrationError("bad migration stream: short pages frame")
    (count,) = struct.unpack_from("<I", raw)
    if count > PAGES_PER_FRAME or len(raw) != 4 + count * (4 + PAGE_SIZE):
        raise MigrationError("bad migration stream: pages frame length does not match its count")
    index = struct.unpack_from(f"<{count}I", raw, 4)
    at = 4 + 4 * count
    for i, p in enumerate(index):
        if p >= npages:
            raise MigrationError(f"bad migration stream: page {p} is outside the guest's {npages} pages")
        ram[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = raw[at + i * PAGE_SIZE:at + (i + 1) * PAGE_SIZE]
    return index


def nonzero_pages(ram: mmap.mmap, size: int, start: int = 0) -> list[int]:
    """The indexes of the pages of ram[start:size] that are not all zeros."""
    out = []
    for base in range(start, size, _CHUNK):
        end = min(base + _CHUNK, size)
        chunk = ram[base:end]
        if chunk == _ZERO_CHUNK[:end - base]:
            continue
        out += [(base + off) >> 12 for off in range(0, end - base, PAGE_SIZE)
                if chunk[off:off + PAGE_SIZE] != _ZERO_PAGE]
    return out


def encode_code(keys: Sequence[tuple[int, int, int]]) -> bytes:
    """A CODE frame's payload: the last MAX_CODE of `keys` ((privilege, pc, physical page))."""
    keys = keys[-MAX_CODE:]
    body = bytearray(struct.pack("<I", len(keys)))
    for priv, pc, ppn in keys:
        body += _CODE_ENTRY.pack(pc, ppn, priv)
    return zstandard.ZstdCompressor(level=1).compress(bytes(body))


def parse_code(payload: bytes, ram_base: int, npages: int) -> dict[int, list[tuple[int, int, int]]]:
    """A CODE frame (untrusted): its blocks by RAM page index, those outside RAM dropped
    (the engine checks the privileges again)."""
    raw = _decompress(payload, MAX_CODE_RAW, "code")
    if len(raw) < 4:
        raise MigrationError("bad migration stream: short code frame")
    (count,) = struct.unpack_from("<I", raw)
    if count > MAX_CODE or len(raw) != 4 + count * _CODE_ENTRY.size:
        raise MigrationError("bad migration stream: code frame length does not match its count")
    first = ram_base >> 12
    out: dict[int, list[tuple[int, int, int]]] = {}
    for pc, ppn, priv in _CODE_ENTRY.iter_unpack(memoryview(raw)[4:]):
        if 0 <= ppn - first < npages and priv in (0, 1, 3):
            out.setdefault(ppn - first, []).append((priv, pc, ppn))
    return out


def rarp_announce(mac: bytes) -> bytes:
    """A RARP request for `mac` from `mac` (what QEMU sends after a migration): switches
    learn where the guest's MAC now is."""
    return (b"\xff" * 6 + mac + b"\x80\x35" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3)
            + mac + bytes(4) + mac + bytes(4) + bytes(18))


# -- disk copy ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskCopy:
    """A disk the source copies, as its greeting declares it."""
    format: str          # raw or qcow2: the image the destination makes
    size: int            # bytes the guest sees
    allocated: int       # bytes it holds on the source (the destination checks its free space)

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "size": self.size, "allocated": self.allocated}


def declare_disk(backend: Any) -> DiskCopy:
    """What the source says of a disk it copies: its format, size and the bytes its image
    and backing chain hold (at most its size: the copy is flattened)."""
    allocated, b = 0, backend
    while b is not None:
        with contextlib.suppress(OSError, AttributeError, TypeError):
            allocated += os.fstat(b.fd).st_blocks * 512
        b = getattr(b, "backing", None)
    return DiskCopy(getattr(backend, "format", "raw"), backend.size, min(backend.size, allocated))


def parse_disk_copies(raw: Any) -> list[DiskCopy]:
    """The greeting's "disks" (untrusted): at most MAX_DISKS, each raw or qcow2, 512 B to
    MAX_DISK_COPY in whole sectors, allocated within its size."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_DISKS:
        raise MigrationError(f"bad migration stream: the disks to copy are not a list of at most {MAX_DISKS}")
    out = []
    for d in raw:
        if not isinstance(d, dict) or d.get("format") not in ("raw", "qcow2") or set(d) != {"format", "size",
                                                                                              "allocated"}:
            raise MigrationError("bad migration stream: a disk to copy is not {format: raw|qcow2, size, allocated}")
        size, allocated = d["size"], d["allocated"]
        if type(size) is not int or type(allocated) is not int or not 0 <= allocated <= size:
            raise MigrationError("bad migration stream: a disk to copy has a bad size")
        if not 512 <= size <= MAX_DISK_COPY or size % 512:
            raise MigrationError(f"a disk of {size} bytes to copy: this host takes whole sectors up to "
                                 f"{MAX_DISK_COPY >> 30} GiB")
        out.append(DiskCopy(d["format"], size, allocated))
    return out


def _free_space(where: Path) -> int:
    p = where
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def copy_targets(disks: Any, copies: list[DiskCopy], disk_dir: Path) -> list[dict[str, Any]]:
    """The spec's disks as the destination has them: each a new image it makes in `disk_dir`
    (named diskN.raw or diskN.qcow2 here, whatever the source's were), the format explicit;
    refused when the declared bytes do not fit the file system there."""
    if not isinstance(disks, list) or len(disks) != len(copies) or not all(isinstance(d, dict) for d in disks):
        raise MigrationError(f"bad migration stream: {len(copies)} disks declared for a VM with "
                             f"{len(disks) if isinstance(disks, list) else 'no list of'} disks")
    need = sum(c.allocated for c in copies)
    free = _free_space(disk_dir) - SPACE_RESERVE
    if need > free:
        raise MigrationError(f"no room for the disks here: {need >> 20} MiB to copy, {max(0, free) >> 20} MiB free")
    return [{**d, "path": str(disk_dir / f"disk{i}.{c.format}"), "format": c.format}
            for i, (d, c) in enumerate(zip(disks, copies))]


def encode_blocks(disk: int, backend: Any, blocks: Sequence[int], skip_zeros: bool,
                  cctx: zstandard.ZstdCompressor) -> tuple[bytes | None, int, int]:
    """A BLOCKS frame's payload for `blocks` (at most BLOCKS_PER_FRAME) of disk number `disk`,
    read through `backend` -- what the guest sees; a block of zeros goes as a flag, or not at
    all with `skip_zeros` (a new image reads as zeros already).  (payload or None when
    nothing is to go, blocks in it, data bytes in it)."""
    head = bytearray()
    data = bytearray()
    count = 0
    for b in blocks:
        n = min(BLOCK, backend.size - b * BLOCK)
        at = len(data)
        data += _ZERO_BLOCK[:n]
        backend.readinto(b * BLOCK, memoryview(data)[at:at + n])
        zero = data[at:] == _ZERO_BLOCK[:n]
        if zero:
            del data[at:]
            if skip_zeros:
                continue
        head += struct.pack("<QB", b, zero)
        count += 1
    if not count:
        return None, 0, 0
    return cctx.compress(struct.pack("<BI", disk, count) + bytes(head) + bytes(data)), count, len(data)


class DiskReceiver:
    """The destination's side of a disk copy: the new images, made at the paths of `spec`'s
    disks (which the destination chose; an existing file is never taken) and written, once
    the board has opened them, through `writers` (its backends) as BLOCKS arrive, each block
    inside its disk; new data may take at most the file system's free space less
    SPACE_RESERVE.  `abort()` removes every image it made (close the writers first)."""

    def __init__(self, spec: VmSpec, copies: list[DiskCopy]) -> None:
        from pyvirt.backends.qcow2_tools import create_qcow2
        self.copies = copies
        self.made: list[Path] = []
        self.writers: list[Any] = []
        self.own = False                  # writers of its own (else the board's)
        self.blocks = [-(-c.size // BLOCK) for c in copies]
        self.written = [bytearray(-(-n // 8)) for n in self.blocks]     # a bit a block: written here
        self.used = 0
        try:
            if len(spec.disks) != len(copies):
                raise MigrationError("bad migration stream: the disks declared are not the spec's")
            self.budget = _free_space(Path(spec.disks[0].path).parent) - SPACE_RESERVE if copies else 0
            for disk, c in zip(spec.disks, copies):
                path = Path(disk.path)
                if c.format == "qcow2":
                    create_qcow2(path, c.size)
                else:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                    self.made.append(path)
                    try:
                        os.ftruncate(fd, c.size)
                    finally:
                        os.close(fd)
                if path not in self.made:
                    self.made.append(path)
        except OSError as e:
            self.abort()
            raise MigrationError(f"cannot make the copied disks here: {e.strerror or e}") from None
        except BaseException:
            self.abort()
            raise

    def apply(self, payload: bytes) -> int:
        """Write a BLOCKS frame; returns how many blocks."""
        raw = _decompress(payload, MAX_BLOCKS_RAW, "blocks")
        if len(raw) < 5:
            raise MigrationError("bad migration stream: short blocks frame")
        disk, count = struct.unpack_from("<BI", raw)
        if disk >= len(self.writers):
            raise MigrationError(f"bad migration stream: disk {disk} is not one of the {len(self.writers)} copied")
        if count > BLOCKS_PER_FRAME or len(raw) < 5 + 9 * count:
            raise MigrationError("bad migration stream: blocks frame length does not match its count")
        c, w, written, nblocks = self.copies[disk], self.writers[disk], self.written[disk], self.blocks[disk]
        at = 5 + 9 * count
        try:
            for i in range(count):
                b, zero = struct.unpack_from("<QB", raw, 5 + 9 * i)
                if b >= nblocks or zero > 1:
                    raise MigrationError(f"bad migration stream: block {b} is outside disk {disk}'s "
                                         f"{nblocks} blocks" if b >= nblocks else
                                         "bad migration stream: a block's zero flag is not 0 or 1")
                off = b * BLOCK
                n = min(BLOCK, c.size - off)
                seen = written[b >> 3] >> (b & 7) & 1
                if zero:
                    if seen:                   # (a block never written reads as zeros already)
                        self._zero(w, off, n)
                    continue
                if at + n > len(raw):
                    raise MigrationError("bad migration stream: blocks frame length does not match its count")
                if not seen:
                    self.used += n
                    if self.used > self.budget:
                        raise MigrationError("the copied disks outgrow the free space here")
                    written[b >> 3] |= 1 << (b & 7)
                w.write(off, memoryview(raw)[at:at + n])
                at += n
        except OSError as e:
            raise MigrationError(f"cannot write copied disk {disk}: {e.strerror or e}") from None
        if at != len(raw):
            raise MigrationError("bad migration stream: blocks frame length does not match its count")
        return count

    @staticmethod
    def _zero(w: Any, off: int, n: int) -> None:
        own = getattr(w, "write_zeroes", None)
        if own is not None:
            own(off, n)
        else:
            w.write(off, _ZERO_BLOCK[:n])

    def open_writers(self, spec: VmSpec) -> None:
        """Write through backends of its own (where no board has the images open)."""
        from pyvirt.backends.disk import open_disk
        self.own = True
        for d in spec.disks:
            self.writers.append(open_disk(d.path, fmt=d.format))

    def close_writers(self) -> None:
        """Its own backends closed (the board's are the board's)."""
        if self.own:
            for w in self.writers:
                with contextlib.suppress(Exception):
                    w.close()
            self.writers = []

    def finish(self) -> None:
        """Every block is in: written back to the files."""
        try:
            for w in self.writers:
                w.flush()
        except OSError as e:
            raise MigrationError(f"cannot write the copied disks: {e.strerror or e}") from None
        self.close_writers()

    def abort(self) -> None:
        self.close_writers()
        for p in self.made:
            with contextlib.suppress(OSError):
                p.unlink()
        self.made = []


# -- the source --------------------------------------------------------------------------------------
@dataclass
class MigrationStats:
    rounds: int = 0
    pages_sent: int = 0
    blocks_sent: int = 0          # disk blocks (BLOCK bytes) copied, zero blocks included
    bytes_sent: int = 0
    total_seconds: float = 0.0
    downtime_seconds: float = 0.0
    throttle: float = 0.0
    bandwidth: float = 0.0        # raw page bytes per second, as measured
    guest_instructions: int = 0   # what the guest ran at the source while it was being migrated
    outcome: str = "running"      # running, completed, cancelled, failed
    error: str | None = None
    history: list[int] = field(default_factory=list)   # pages left at each round's start

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


class Migration:
    """Migrate `vm` to the destination at the other end of `sock` (connected); drive it by
    calling `tick()` between slices (`Vm.start_migration` adds the watch) until `done`."""

    def __init__(self, vm: Any, sock: socket.socket, token: str = "", *, downtime: float = DEFAULT_DOWNTIME,
                 timeout: float = DEFAULT_TIMEOUT, on_timeout: str = "cancel", auto_converge: bool = True,
                 max_bandwidth: float | None = None, spec_json: dict[str, Any] | None = None,
                 copy_storage: bool = False, finished: Callable[[MigrationStats], None] | None = None) -> None:
        if on_timeout not in ("cancel", "force"):
            raise MigrationError(f"on timeout: cancel or force, not {on_timeout!r}")
        if not 0 < downtime <= 60:
            raise MigrationError("the downtime target must be between 0 and 60 seconds")
        self.vm, self.sock, self.token = vm, sock, token
        self.downtime, self.timeout, self.on_timeout = downtime, timeout, on_timeout
        self.auto_converge = auto_converge
        self.max_bandwidth = max_bandwidth           # bytes of pages a second (QEMU's max-bandwidth)
        self.spec_json = spec_json if spec_json is not None else json.loads(vm.spec.model_dump_json())
        self.finished = finished
        self.copy_storage = copy_storage and bool(vm.spec.disks)
        self.stats = MigrationStats()
        self.done = False
        self._cctx = zstandard.ZstdCompressor(level=1)
        self._pending: list[int] = []
        self._out = bytearray()           # frames queued for the socket (see _pump)
        self._scan_at = 0                 # round 1: RAM below this was scanned for non-zero pages
        self._scan_end = 0
        self._found = 0
        self._syncing = False             # a SYNC went, its OK not read yet
        # disk copy: (disk, blocks, first round) still to send; the trackers in front of the
        # disks (disk, its backend, the tracker, the devices using it)
        self._blocks: list[tuple[int, Sequence[int], bool]] = []
        self._tracked: list[tuple[int, Any, TrackedBackend, list[Any]]] = []
        self._started = 0.0
        self._last_tick = 0.0
        self._send_time = 0.0             # encoding and sending, and the destination's lag (_pump)
        self._stalled_at: float | None = None   # since then frames wait on the destination
        self._send_bytes = 0
        self._stuck = 0
        self._instructions = 0
        self._guest_time = 0.0
        self._spent = 0.0

    # The handshake runs before the first page: a refused spec costs nothing.
    def start(self) -> None:
        self._started = time.monotonic()
        self._instructions = self.vm.stats.instructions
        try:
            self.sock.settimeout(30)
            hello: dict[str, Any] = {"protocol": PROTOCOL, "version": VERSION, "token": self.token}
            if self.copy_storage:
                hello["disks"] = [declare_disk(b).as_dict() for b in self.vm.board.backends]
            send_frame(self.sock, HELLO, json.dumps(hello).encode())
            recv_frame(self.sock, (OK,))
            send_frame(self.sock, SPEC, json.dumps(self.spec_json).encode())
            recv_frame(self.sock, (OK,))
        except (MigrationError, OSError) as e:
            self._fail(e)
            return
        board = self.vm.board
        bus = board.bus
        if self.copy_storage:
            self._track_disks()
        bus.start_dirty_log()
        keys = getattr(getattr(board, "engine", None), "block_keys", None)
        if keys is not None:
            self._queue(CODE, encode_code(keys()))
        self._scan_at, self._scan_end = 0, bus.ram_size      # round 1: found as it goes (tick)
        self.stats.rounds = 1
        self._last_tick = time.monotonic()

    # -- disk copy --------------------------------------------------------------------------
    def _track_disks(self) -> None:
        """A dirty-block bitmap in front of every disk; round 1 is each disk whole."""
        board = self.vm.board
        blks = [t.device for _, _, t in board.virtio if hasattr(t.device, "backend")]
        for i, backend in enumerate(board.backends):
            tracked = TrackedBackend(backend)
            devs = [d for d in blks if d.backend is backend]
            for d in devs:
                d.backend = tracked
            board.backends[i] = tracked
            self._tracked.append((i, backend, tracked, devs))
            self._blocks.append((i, range(tracked.log.count), True))

    def _untrack_disks(self) -> None:
        board = self.vm.board
        for i, backend, tracked, devs in self._tracked:
            for d in devs:
                if d.backend is tracked:
                    d.backend = backend
            if board.backends[i] is tracked:
                board.backends[i] = backend
        self._tracked = []

    def _harvest_blocks(self) -> list[tuple[int, Sequence[int], bool]]:
        out: list[tuple[int, Sequence[int], bool]] = []
        for i, _, tracked, devs in self._tracked:
            if self.vm.board.backends[i] is not tracked or any(d.backend is not tracked for d in devs):
                raise MigrationError("the VM's disks changed during the migration (a snapshot?)")
            dirty = tracked.log.harvest()
            if dirty:
                out.append((i, dirty, False))
        return out

    def _send_blocks(self) -> None:
        """Up to BLOCKS_PER_FRAME blocks of the first disk waiting (in round 1 a block of
        zeros is skipped: the destination's new image reads as zeros already)."""
        disk, blocks, first = self._blocks[0]
        part, rest = blocks[:BLOCKS_PER_FRAME], blocks[BLOCKS_PER_FRAME:]
        if rest:
            self._blocks[0] = (disk, rest, first)
        else:
            self._blocks.pop(0)
        t0 = time.monotonic()
        inner = self._tracked[[t[0] for t in self._tracked].index(disk)][1]
        payload, count, raw = encode_blocks(disk, inner, part, first, self._cctx)
        if payload is None:
            return
        self.stats.bytes_sent += self._queue(BLOCKS, payload)
        self.stats.blocks_sent += count
        self._send_time += time.monotonic() - t0
        self._send_bytes += raw
        if self._send_time > 0.005:
            self.stats.bandwidth = self._send_bytes / self._send_time

    def _send_pages(self, pages: list[int]) -> None:
        ram = self.vm.board.bus.ram
        t0 = time.monotonic()
        for i in range(0, len(pages), PAGES_PER_FRAME):
            part = pages[i:i + PAGES_PER_FRAME]
            self.stats.bytes_sent += self._queue(PAGES, encode_pages(ram, part, self._cctx))
            self.stats.pages_sent += len(part)
        self._send_time += time.monotonic() - t0
        self._send_bytes += len(pages) * PAGE_SIZE
        if self._send_time > 0.005:
            self.stats.bandwidth = self._send_bytes / self._send_time

    def _queue(self, kind: int, payload: bytes = b"") -> int:
        self._out += HEADER.pack(kind, len(payload))
        self._out += payload
        return HEADER.size + len(payload)

    def _pump(self, wait: float | None = 0.0) -> None:
        """Send queued frames: what the socket takes now (`wait` 0: while the guest runs,
        waiting for a slow destination would be the guest's time lost), what it takes
        within `wait` seconds, or all of them (None)."""
        out, sock = self._out, self.sock
        t0 = time.monotonic()
        until = None if wait is None else t0 + wait
        try:
            while out:
                if until is not None:
                    left = max(0.0, until - time.monotonic())
                    if not select.select([], [sock], [], left)[1]:
                        break
                n = sock.send(memoryview(out)[:1 << 20])
                del out[:n]
        finally:
            # The bandwidth counts the time spent here and, as a blocking send would, the
            # time frames waited on a destination slower than the sender.
            now = time.monotonic()
            if self._stalled_at is None:
                self._send_time += now - t0
                if out:
                    self._stalled_at = now
            elif not out:
                self._send_time += now - self._stalled_at
                self._stalled_at = None

    def _synced(self) -> bool:
        """The round is all sent: SYNC, then True once the destination's OK says it has
        taken in everything before it (a link with big buffers -- TCP -- would otherwise
        leave the destination's backlog to the pause)."""
        if not self._syncing:
            self._queue(SYNC)
            self._syncing = True
            self._pump()
            return False
        if self._out:
            self._pump()
            if self._out:
                return False
        if self._stalled_at is None:
            self._stalled_at = time.monotonic()   # (all sent: the wait now is the destination's lag)
        if not select.select([self.sock], [], [], 0)[0]:
            return False
        recv_frame(self.sock, (OK,))
        self._syncing = False
        self._send_time += time.monotonic() - self._stalled_at
        self._stalled_at = None
        if self._send_time > 0.005:
            self.stats.bandwidth = self._send_bytes / self._send_time
        return True

    def _scan(self) -> None:
        """Round 1: the next chunk of RAM's non-zero pages to send (only the pages the
        process's page table has, where it can tell: most of a guest's RAM was never
        touched, and reading it would map every page)."""
        bus = self.vm.board.bus
        end = min(self._scan_at + SCAN_MAPPED, self._scan_end)
        touched = bus.touched_pages(self._scan_at >> 12, (end - self._scan_at) >> 12)
        if touched is None:
            end = min(self._scan_at + SCAN_CHUNK, self._scan_end)
            found = nonzero_pages(bus.ram, end, self._scan_at)
        else:
            ram = bus.ram
            found = [p for p in touched if ram[p << 12:(p + 1) << 12] != _ZERO_PAGE]
        self._scan_at = end
        self._pending += found
        self._found += len(found)
        if end >= self._scan_end:
            self.stats.history.append(self._found)

    def tick(self) -> None:
        if self.done:
            return
        now = time.monotonic()
        self._guest_time += now - self._last_tick       # the guest's time since the last tick
        try:
            # The sender's time is kept to its share: a quarter, more as auto-converge cuts the guest's.
            guest = (1 - SENDER_SHARE) * (1 - self.stats.throttle)
            allowed = self._guest_time * (1 - guest) / guest - self._spent
            if not self.stats.throttle:          # (throttled, the guest is meant to wait)
                allowed = min(allowed, MAX_SEND_TICK)
            if allowed > 0:
                end = now + allowed
                while True:
                    if len(self._out) >= OUT_HIGH:
                        self._pump()
                        if len(self._out) >= OUT_HIGH:
                            break                        # the link (or the destination) is behind
                    scanning = self._scan_at < self._scan_end
                    if not self._pending and not self._blocks and not scanning:
                        self._pump()
                        if self._out or not self._synced():       # this round is not all in yet
                            break
                        if self._next_round():
                            return
                        if self.stats.throttle:          # throttled: the guest waits anyway
                            time.sleep(max(0.0, min(end - time.monotonic(), MAX_TICK)))
                        break
                    if self.max_bandwidth and self._send_bytes >= (now - self._started) * self.max_bandwidth:
                        if self.stats.throttle:          # the link is the limit: the guest waits
                            time.sleep(max(0.0, min(end - time.monotonic(), MAX_TICK)))
                        break
                    if self._blocks:
                        self._send_blocks()
                    elif self._pending and (len(self._pending) >= PAGES_PER_FRAME or not scanning):
                        part, self._pending = self._pending[:PAGES_PER_FRAME], self._pending[PAGES_PER_FRAME:]
                        self._send_pages(part)
                    else:
                        self._scan()
                    if time.monotonic() >= end:
                        break
                self._pump()
                self._spent += time.monotonic() - now
            if now - self._started > self.timeout:
                if self.on_timeout == "force":
                    self._finish()
                else:
                    self._abandon("cancelled", "the migration timed out and was cancelled")
        except (MigrationError, OSError) as e:
            self._fail(e)
        finally:
            self._last_tick = time.monotonic()

    def _next_round(self) -> bool:
        """A round was sent: take the next from the log, or finish; True when done."""
        dirty = sorted(self.vm.board.bus.harvest_dirty())
        blocks = self._harvest_blocks()
        left = len(dirty) * PAGE_SIZE + sum(len(b) for _, b, _ in blocks) * BLOCK
        bw = min(self.stats.bandwidth or 1 << 30, self.max_bandwidth or 1 << 40)
        self._blocks = blocks
        if left / bw <= self.downtime:
            self._pending = dirty
            self._finish()
            return True
        history = self.stats.history
        units = left // PAGE_SIZE                       # (what is left, in pages)
        if self.auto_converge and history and units > history[-1] * 0.9:
            self._stuck += 1
            if self._stuck >= 2:
                steps = [s for s in THROTTLE_STEPS if s > self.stats.throttle]
                if steps:
                    self.stats.throttle = steps[0]
                self._stuck = 0
        self._pending = dirty
        self.stats.rounds += 1
        history.append(units)
        return False

    def _finish(self) -> None:
        """The stop-and-copy phase, at a slice boundary: the guest does not run during it."""
        vm = self.vm
        board = vm.board
        t0 = time.monotonic()
        board.clock.pause()
        try:
            if self._tracked:                         # the last disk blocks: the guest writes no more
                self._blocks += self._harvest_blocks()
                while self._blocks:
                    self._send_blocks()
            if self._scan_at < self._scan_end:         # (forced before round 1 was found)
                self._pending += nonzero_pages(board.bus.ram, self._scan_end, self._scan_at)
                self._scan_at = self._scan_end
            self._send_pages(sorted(set(self._pending) | board.bus.harvest_dirty()))
            self._pending = []
            state = json.dumps(board.save_state(), default=encode_bytes).encode()
            self.stats.bytes_sent += self._queue(STATE, self._cctx.compress(state))
            self._queue(COMPLETE)
            self.sock.settimeout(60)
            self._pump(None)
            if self._syncing:                        # (forced while a SYNC was out)
                recv_frame(self.sock, (OK,))
                self._syncing = False
            recv_frame(self.sock, (READY,))
            send_frame(self.sock, GO)
        except (MigrationError, OSError) as e:
            board.clock.resume()
            self._fail(e)
            return
        self.stats.downtime_seconds = time.monotonic() - t0
        board.bus.stop_dirty_log()
        self._end("completed")
        vm.migrated = True
        vm.request_quit()                 # the clock stays stopped: this VM runs no more

    def _abandon(self, outcome: str, why: str) -> None:
        try:
            self._pump(1.0)                             # (a frame half sent first)
            if not self._out:
                send_frame(self.sock, ABANDON)
        except OSError:
            pass
        self.stats.error = why
        self.vm.board.bus.stop_dirty_log()
        self._end(outcome)

    def _fail(self, e: BaseException) -> None:
        self._abandon("failed", str(e) if isinstance(e, MigrationError) else f"migration connection failed: {e}")

    def _end(self, outcome: str) -> None:
        self.done = True
        self._untrack_disks()
        self.stats.outcome = outcome
        self.stats.total_seconds = time.monotonic() - self._started
        self.stats.guest_instructions = self.vm.stats.instructions - self._instructions
        self.stats.throttle = self.stats.throttle if outcome == "completed" else 0.0
        try:
            self.sock.close()
        except OSError:
            pass
        if self.finished is not None:
            self.finished(self.stats)

    def attach(self) -> None:
        """Start (the handshake) and drive the rest from the VM's run loop, between slices."""
        from pyvirt.vmm.vm import Watch
        self.start()
        if self.done:
            return
        watch = Watch(lambda: [], lambda ready: None, None)

        def on_tick() -> None:
            self.tick()
            if self.done and watch in self.vm.watches:
                self.vm.watches.remove(watch)
        watch.on_tick = on_tick
        self.vm.watches.append(watch)

    def cancel(self) -> None:
        if not self.done:
            self._abandon("cancelled", "the migration was cancelled")


# -- the destination ----------------------------------------------------------------------------------
def default_accept(spec_json: Any, copies: list[DiskCopy] | None = None, disk_dir: Path | None = None) -> VmSpec:
    """The spec as sent, its disks -- when the source copies them -- new images in `disk_dir`
    (a destination without one takes no disk copies)."""
    from pydantic import ValidationError

    from pyvirt.machine.riscv_virt import VirtBoard
    if copies:
        if disk_dir is None or not isinstance(spec_json, dict):
            raise MigrationError("this destination takes no disk copies (share the disks)")
        spec_json = spec_json | {"disks": copy_targets(spec_json.get("disks"), copies, disk_dir)}
    try:
        spec = VmSpec.model_validate(spec_json)
    except ValidationError as e:
        err = e.errors()[0]
        raise MigrationError(f"invalid spec: {'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}") from None
    VirtBoard.check_devices(spec)
    return spec


def _refuse(sock: socket.socket, e: BaseException) -> MigrationError:
    """Tell the source why (best effort); the error to raise here."""
    if isinstance(e, OSError) and not isinstance(e, PyvirtError):
        return MigrationError(f"migration connection failed: {e.strerror or e}")
    try:
        send_frame(sock, ERROR, str(e).encode()[:1000])
    except OSError:
        pass
    return e if isinstance(e, MigrationError) else MigrationError(str(e))


def accept_handshake(sock: socket.socket, token: str,
                     accept: Callable[[Any, list[DiskCopy]], VmSpec] = default_accept,
                     timeout: float = 60, greeting: dict[str, Any] | None = None) -> VmSpec:
    """The destination's first half: the greeting (protocol, version, token, the disks the
    source copies) and the spec (`accept` turns it and the disk copies into the spec to run
    here, or raises); both answered OK.  `greeting` gets the greeting's "cold" (a stopped VM:
    only the definition moves, see `send_cold`) and "disks" (the DiskCopy list)."""
    sock.settimeout(timeout)
    try:
        _, raw = recv_frame(sock, (HELLO,), MAX_HELLO)
        try:
            hello = json.loads(raw)
        except (ValueError, RecursionError):           # (RecursionError: "[[[[..." nested too deep)
            hello = None
        if not isinstance(hello, dict):
            raise MigrationError("bad migration stream: the greeting is not a JSON object")
        if hello.get("protocol") != PROTOCOL:
            raise MigrationError("not a pyvirt migration stream")
        if hello.get("version") != VERSION:
            raise MigrationError(f"migration protocol version {hello.get('version')!r} is not supported "
                                 f"(this pyvirt speaks {VERSION})")
        if not isinstance(hello.get("token"), str) or not hmac.compare_digest(hello["token"].encode(),
                                                                             token.encode()):
            raise MigrationError("wrong migration token")
        copies = parse_disk_copies(hello.get("disks"))
        if greeting is not None:
            greeting["cold"] = hello.get("cold") is True
            greeting["disks"] = copies
        send_frame(sock, OK)
        _, raw = recv_frame(sock, (SPEC,), MAX_HELLO)
        try:
            spec = accept(json.loads(raw), copies)
        except (ValueError, RecursionError, PyvirtError) as e:
            raise MigrationError(f"the spec cannot run here: {e}") from None
        send_frame(sock, OK)
        return spec
    except (PyvirtError, OSError) as e:
        raise _refuse(sock, e) from None


def receive_machine(sock: socket.socket, spec: VmSpec, console: CharBackend, timeout: float = 60,
                    copies: list[DiskCopy] | None = None) -> Any:
    """The destination's second half: the board is built at once (building parses the native
    code cache, a quarter of a second: done while pre-copy runs, not in the pause), then the
    source's translated blocks (CODE: each page's are translated here as the page arrives),
    pages (and with `copies`, disk blocks into new images at the paths `spec` names, through
    the board's own backends -- or, when a copied disk is read-only to the guest, through
    writable ones of the copy's, the board then built at COMPLETE), state, COMPLETE -> the
    state loaded (the translations kept, the clock stopped until the VM runs) -> READY, then
    GO; returns the Vm, not yet running.  Nothing stays open on failure, and no copied disk."""
    from pyvirt.vmm.resources import build_board
    from pyvirt.vmm.snapcheck import check_state
    from pyvirt.vmm.vm import Vm

    sock.settimeout(timeout)
    disks: DiskReceiver | None = None
    board = None
    try:
        ram = anonymous_ram(spec.memory + RAM_TAIL)
        npages = spec.memory // PAGE_SIZE
        state_raw = None
        if copies:
            disks = DiskReceiver(spec, copies)
        if disks is not None and any(d.read_only for d in spec.disks):
            disks.open_writers(spec)
        else:
            board = build_board(spec, console, ram=ram, restore=True)
            board.bus.ram_private = True          # (anonymous memory of this process's)
            if disks is not None:
                disks.writers = list(board.backends)
        code: dict[int, list[tuple[int, int, int]]] | None = None
        expect = (CODE, PAGES, SYNC, STATE, COMPLETE, ABANDON) + ((BLOCKS,) if disks else ())
        while True:
            kind, payload = recv_frame(sock, expect)
            if kind == PAGES:
                written = apply_pages(ram, npages, payload)
                if board is not None:
                    _written(board, written, code)
            elif kind == SYNC:
                send_frame(sock, OK)
            elif kind == CODE:                 # (once; no board yet: nothing to translate into)
                code = parse_code(payload, board.bus.ram_base, npages) if board is not None else None
                expect = tuple(k for k in expect if k != CODE)
            elif kind == BLOCKS and disks is not None:
                disks.apply(payload)
            elif kind == STATE:
                state_raw = _decompress(payload, MAX_STATE, "state")
            elif kind == ABANDON:
                raise MigrationError("the source abandoned the migration")
            else:
                break
        if state_raw is None:
            raise MigrationError("bad migration stream: COMPLETE without the machine's state")
        try:
            state = json.loads(state_raw)
        except (ValueError, RecursionError):
            raise MigrationError("bad migration stream: the state is not JSON") from None
        if disks is not None:
            disks.finish()
        if board is None:
            board = build_board(spec, console, ram=ram, restore=True)
            board.bus.ram_private = True
        try:
            board.load_state(check_state(board, state), keep_code=True)
            board.clock.pause()               # until the VM runs (Vm.run): the guest sees no wait
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise MigrationError(f"bad migration stream: the state does not fit the machine: {e}") from None
        except PyvirtError as e:
            raise MigrationError(f"bad migration stream: {e}") from None
        send_frame(sock, READY)
        recv_frame(sock, (GO,))
        return Vm(spec, console, board=board)
    except BaseException as e:
        if board is not None:
            board.close()
        if disks is not None:
            disks.abort()
        if isinstance(e, (PyvirtError, OSError)):
            raise _refuse(sock, e) from None
        raise


def _written(board: Any, pages: tuple[int, ...], code: dict[int, list[tuple[int, int, int]]] | None) -> None:
    """Pages of RAM arrived: blocks translated from them before are dropped (a page sent
    again), those the source named on them are translated (on a page's first arrival)."""
    bus = board.bus
    first = bus.ram_base >> 12
    watched = bus.watched
    for p in pages:
        if first + p in watched:
            bus.dma_written(bus.ram_base + p * PAGE_SIZE, PAGE_SIZE)
        if code:
            keys = code.pop(p, None)
            if keys:
                board.engine.warm(keys)


def receive(sock: socket.socket, token: str, console: CharBackend, timeout: float = 60,
            disk_dir: Path | None = None) -> Any:
    """Serve one incoming migration on `sock`; returns the new Vm, built and loaded, not yet
    running (the caller runs it and then `announce()`s it).  Disks the source copies become
    new images in `disk_dir` (none: refused).  Any problem is one MigrationError (the source
    was told why); nothing stays open."""
    greeting: dict[str, Any] = {}
    spec = accept_handshake(sock, token, lambda s, c: default_accept(s, c, disk_dir), timeout, greeting)
    return receive_machine(sock, spec, console, timeout, greeting["disks"])


def send_cold(sock: socket.socket, token: str, spec_json: dict[str, Any], disks: Sequence[Any] = ()) -> None:
    """Move a stopped VM's definition: HELLO (cold), SPEC, with `disks` (its opened disks,
    one per spec disk) every non-zero block of each, COMPLETE -> READY (recorded there) -> GO.
    MigrationError with the destination's reason if it refused."""
    sock.settimeout(30)
    hello: dict[str, Any] = {"protocol": PROTOCOL, "version": VERSION, "token": token, "cold": True}
    if disks:
        hello["disks"] = [declare_disk(d).as_dict() for d in disks]
    try:
        send_frame(sock, HELLO, json.dumps(hello).encode())
        recv_frame(sock, (OK,))
        send_frame(sock, SPEC, json.dumps(spec_json).encode())
        recv_frame(sock, (OK,))
        cctx = zstandard.ZstdCompressor(level=1)
        for i, d in enumerate(disks):
            count = -(-d.size // BLOCK)
            for b in range(0, count, BLOCKS_PER_FRAME):
                payload, _, _ = encode_blocks(i, d, range(b, min(b + BLOCKS_PER_FRAME, count)), True, cctx)
                if payload is not None:
                    send_frame(sock, BLOCKS, payload)
        send_frame(sock, COMPLETE)
        recv_frame(sock, (READY,))
        send_frame(sock, GO)
    except OSError as e:
        raise MigrationError(f"migration connection failed: {e.strerror or e}") from None


def receive_cold(sock: socket.socket, spec: VmSpec | None = None, copies: list[DiskCopy] | None = None) -> None:
    """The destination's side of `send_cold` after the handshake: with `copies`, the disks'
    blocks into new images at the paths `spec` names; COMPLETE -> READY -> GO.  A failure
    leaves no image."""
    disks: DiskReceiver | None = None
    try:
        if copies and spec is not None:
            disks = DiskReceiver(spec, copies)
            disks.open_writers(spec)
            while True:
                kind, payload = recv_frame(sock, (BLOCKS, COMPLETE, ABANDON))
                if kind == ABANDON:
                    raise MigrationError("the source abandoned the migration")
                if kind == COMPLETE:
                    break
                disks.apply(payload)
            disks.finish()
        else:
            recv_frame(sock, (COMPLETE,))
        send_frame(sock, READY)
        recv_frame(sock, (GO,))
    except BaseException as e:
        if disks is not None:
            disks.abort()
        if isinstance(e, (PyvirtError, OSError)):
            raise _refuse(sock, e) from None
        raise


def announce(vm: Any) -> None:
    """After the destination resumed: every NIC tells the network where the guest's MAC is."""
    for nic in getattr(vm.board, "nics", []):
        nic.backend.send(rarp_announce(nic.mac))
