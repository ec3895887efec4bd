"""virtio-blk (virtio 1.2, 5.2 "Block Device").

Configuration space (5.2.4), the fields offered here::

    0   le64 capacity     in 512-byte sectors
    8   le32 size_max     VIRTIO_BLK_F_SIZE_MAX: largest single segment
    12  le32 seg_max      VIRTIO_BLK_F_SEG_MAX: most data segments per request
    16  geometry          (not offered: zeros)
    20  le32 blk_size     VIRTIO_BLK_F_BLK_SIZE: 512
    24  topology, writeback, num_queues   (not offered: zeros)
    36  le32 max_discard_sectors, 40 le32 max_discard_seg,
    44  le32 discard_sector_alignment      VIRTIO_BLK_F_DISCARD
    48  le32 max_write_zeroes_sectors, 52 le32 max_write_zeroes_seg,
    56  u8 write_zeroes_may_unmap          VIRTIO_BLK_F_WRITE_ZEROES

One request per descriptor chain (5.2.6)::

    le32 type; le32 reserved; le64 sector;    device-readable header (16 bytes)
    u8 data[];                                readable for OUT, writable for IN/GET_ID
    u8 status;                                the last device-writable byte

The device makes no assumption about how these are split into descriptors
(2.7.4 "Message Framing").  Types: IN (read), OUT (write), FLUSH, GET_ID (the
serial, 20 bytes, NUL-padded), DISCARD and WRITE_ZEROES (data: segments of
le64 sector, le32 num_sectors, le32 flags; flags bit 0 "unmap" is only
allowed for WRITE_ZEROES); anything else is VIRTIO_BLK_S_UNSUPP.  Data
moves between the backend and views of guest RAM (readv/writev: preadv and
pwritev straight into and out of the guest's buffers).  A request out of
range, of a length that is not a multiple of 512, or a write to a read-only
disk completes with VIRTIO_BLK_S_IOERR (5.2.6.1); a chain with no writable
byte for the status completes with 0 bytes written.  None of these stop the
device; only a broken virtqueue does.

With a `RateLimiter` (--disk ...,bw=,iops=) each chain costs one op and its
data bytes (the chain's lengths less header and status) -- for DISCARD and
WRITE_ZEROES also the bytes their segments cover, which the host writes or
deallocates (a request over the bucket's size goes through into debt, so the
long-run rate holds).  A refused chain is
put back on the available ring (`unpop`) and the device returns; the board's
`poll()` calls `poll()` here, which serves the queue again once
`next_deadline()` has passed.  Nothing is held outside guest memory, so a
snapshot taken meanwhile needs no extra device state.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pyvirt.backends.block import SECTOR, BlockBackend
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.queue import Chain, Span, SplitQueue, spans_len, split_spans
from pyvirt.ratelimit import RateLimiter
from pyvirt.state import U64, Schema, blob, boolean, record, text

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
HEADER = struct.Struct("<IIQ")
SIZE_MAX = 1 << 20          # bytes per segment, as advertised
QUEUE_SIZE = 1024           # descriptors a chain may have (2.7.5.3.1), indirect tables included
SEG_MAX = QUEUE_SIZE - 2    # segments per request: a chain less its header and status, so that
                            # a 1 MiB transfer of scattered pages is one request (256 pages)
_CONFIG = struct.Struct("<QIIHBBI8xBxH IIIIIB3x".replace(" ", ""))
SEGMENT = struct.Struct("<QII")       # discard / write-zeroes segment: sector, num_sectors, flags
MAX_DISCARD_SECTORS = 1 << 22         # 2 GiB a segment
MAX_DISCARD_SEG = 32
_ZEROS = bytes(1 << 20)


class VirtioBlk(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    num_queues = 1
    queue_max_size = QUEUE_SIZE

    def __init__(self, backend: BlockBackend, serial: str = "", limiter: RateLimiter | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.limiter = limiter
        self.serves_host = limiter is not None      # (only a throttled disk needs polls and a timer)
        self.serial = serial.encode("utf-8", "replace")[:VIRTIO_BLK_ID_BYTES]
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "errors": 0, "discards": 0, "zeroed": 0,
                      "bytes_read": 0, "bytes_written": 0}

    def features(self) -> int:
        f = (super().features() | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX
             | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH)
        if self.backend.read_only:
            return f | VIRTIO_BLK_F_RO
        return f | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES

    def config(self) -> bytes:
        return _CONFIG.pack(self.backend.size // SECTOR, SIZE_MAX, SEG_MAX, 0, 0, 0, SECTOR,
                            0, 1,                                   # writeback 0, num_queues 1
                            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,
                            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)

    # -- requests -------------------------------------------------------------------------
    def process(self, index: int, queue: SplitQueue) -> None:
        limiter = self.limiter
        while (chain := queue.pop()) is not None:
            if limiter is not None:
                if not limiter.consume(self._cost(queue, chain)):
                    queue.unpop()              # throttled: poll() serves it when tokens are back
                    return
            queue.push(chain.head, self._serve(queue, chain))

    def _cost(self, queue: SplitQueue, chain: Chain) -> int:
        """The bytes a chain moves: its data, and the range a DISCARD / WRITE_ZEROES covers."""
        cost = max(0, chain.readable_len - HEADER.size) + max(0, chain.writable_len - 1)
        if chain.readable_len >= HEADER.size:
            header, data_out = split_spans(chain.readable, HEADER.size)
            kind = HEADER.unpack(queue.gather(header, HEADER.size))[0]
            length = spans_len(data_out)
            if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and 0 < length \
                    and length % SEGMENT.size == 0 and length // SEGMENT.size <= MAX_DISCARD_SEG:
                raw = queue.gather(data_out, length)
                cost += sum(min(count, MAX_DISCARD_SECTORS) * SECTOR for _, count, _ in SEGMENT.iter_unpack(raw))
        return cost

    def poll(self) -> None:
        """Between CPU slices: serve requests held back by the rate limiter once it allows."""
        if self.limiter is not None and self.limiter.due():
            self.notify(0)

    def next_deadline(self) -> int | None:
        """The clock tick a throttled request can go (None: nothing waits)."""
        return None if self.limiter is None or not self.live else self.limiter.wake_at()

    def _serve(self, queue: SplitQueue, chain: Chain) -> int:
        """Carry out one request; returns the bytes written into the chain."""
        if chain.writable_len == 0:
            self.stats["errors"] += 1
            return 0                       # nowhere to put a status: complete with nothing
        data_in, status_span = split_spans(chain.writable, chain.writable_len - 1)
        if chain.readable_len < HEADER.size:
            status, written = VIRTIO_BLK_S_IOERR, 0
        else:
            header, data_out = split_spans(chain.readable, HEADER.size)
            kind, _reserved, sector = HEADER.unpack(queue.gather(header, HEADER.size))
            status, written = self._request(queue, kind, sector, data_in, data_out)
        queue.scatter(status_span, bytes((status,)))
        if status != VIRTIO_BLK_S_OK:
            self.stats["errors"] += 1
        return written + 1

    def _range_ok(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector * SECTOR + length <= self.backend.size

    def _request(self, queue: SplitQueue, kind: int, sector: int, data_in: list[Span],
                 data_out: list[Span]) -> tuple[int, int]:
        """(status, bytes written into data_in)."""
        if kind == VIRTIO_BLK_T_IN:
            return self._read(queue, sector, data_in)
        if kind == VIRTIO_BLK_T_OUT:
            return self._write(queue, sector, data_out)
        if kind == VIRTIO_BLK_T_FLUSH:
            try:
                self.backend.flush()
            except OSError as e:
                log.warning("disk flush failed: %s", e)
                return VIRTIO_BLK_S_IOERR, 0
            self.stats["flushes"] += 1
            return VIRTIO_BLK_S_OK, 0
        if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._discard_or_zero(queue, kind, data_out)
        if kind == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            return VIRTIO_BLK_S_OK, queue.scatter(data_in, ident)
        return VIRTIO_BLK_S_UNSUPP, 0

    def _read(self, queue: SplitQueue, sector: int, data_in: list[Span]) -> tuple[int, int]:
        length = spans_len(data_in)
        if not self._range_ok(sector, length):
            return VIRTIO_BLK_S_IOERR, 0
        views = queue.views(data_in)
        try:
            self.backend.readv(sector * SECTOR, views)
        except OSError as e:
            log.warning("disk read at sector %d failed: %s", sector, e)
            return VIRTIO_BLK_S_IOERR, 0
        finally:
            queue.release_views(views)
            queue.dma_written(data_in)      # written through views: tell the bus
        self.stats["reads"] += 1
        self.stats["bytes_read"] += length
        return VIRTIO_BLK_S_OK, length

    def _write(self, queue: SplitQueue, sector: int, data_out: list[Span]) -> tuple[int, int]:
        length = spans_len(data_out)
        if self.backend.read_only or not self._range_ok(sector, length):
            return VIRTIO_BLK_S_IOERR, 0
        views = queue.views(data_out)
        try:
            self.backend.writev(sector * SECTOR, views)
        except OSError as e:
            log.warning("disk write at sector %d failed: %s", sector, e)
            return VIRTIO_BLK_S_IOERR, 0
        finally:
            queue.release_views(views)
        self.stats["writes"] += 1
        self.stats["bytes_written"] += length
        return VIRTIO_BLK_S_OK, 0

    def _discard_or_zero(self, queue: SplitQueue, kind: int, data_out: list[Span]) -> tuple[int, int]:
        """DISCARD / WRITE_ZEROES (5.2.6.2): every segment is checked before any is done."""
        length = spans_len(data_out)
        if length == 0 or length % SEGMENT.size or length // SEGMENT.size > MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_UNSUPP, 0
        if self.backend.read_only:
            return VIRTIO_BLK_S_IOERR, 0
        raw = queue.gather(data_out, length)
        segments = [SEGMENT.unpack_from(raw, i) for i in range(0, length, SEGMENT.size)]
        for sector, count, flags in segments:
            unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (unmap and kind == VIRTIO_BLK_T_DISCARD):
                return VIRTIO_BLK_S_UNSUPP, 0
            if count > MAX_DISCARD_SECTORS or not self._range_ok(sector, count * SECTOR):
                return VIRTIO_BLK_S_IOERR, 0
        try:
            for sector, count, _flags in segments:
                offset, size = sector * SECTOR, count * SECTOR
                if kind == VIRTIO_BLK_T_DISCARD:
                    self.backend.discard(offset, size)
                else:
                    self._write_zeroes(offset, size)
        except OSError as e:
            log.warning("disk discard/write-zeroes failed: %s", e)
            return VIRTIO_BLK_S_IOERR, 0
        self.stats["discards" if kind == VIRTIO_BLK_T_DISCARD else "zeroed"] += 1
        return VIRTIO_BLK_S_OK, 0

    def _write_zeroes(self, offset: int, size: int) -> None:
        own = getattr(self.backend, "write_zeroes", None)
        if own is not None:
            own(offset, size)
            return
        while size:
            n = min(size, len(_ZEROS))
            self.backend.write(offset, memoryview(_ZEROS)[:n])
            offset += n
            size -= n

    # -- state --------------------------------------------------------------------------------
    def device_state_schema(self) -> Schema:
        backend = record({"path": text(), "size": U64, "read_only": boolean,
                          "format": text(16)}, optional=("format",))
        return record({"backend": backend, "serial": blob(VIRTIO_BLK_ID_BYTES)})

    def save_device(self) -> dict[str, Any]:
        return {"backend": self.backend.save(), "serial": self.serial}

    def load_device(self, state: dict[str, Any]) -> None:
        self.backend.load(state["backend"])
        self.serial = state["serial"]
