"""virtio-blk (virtio 1.2, 5.2 "Block Device").

Configuration space (5.2.4), the fields offered here::

    0   le64 capacity     in 512-byte sectors
    8   le32 size_max     VIRTIO_BLK_F_SIZE_MAX: largest single segment
    12  le32 seg_max      VIRTIO_BLK_F_SEG_MAX: most data segments per request
    16  geometry          (not offered: zeros)
    20  le32 blk_size     VIRTIO_BLK_F_BLK_SIZE: 512

One request per descriptor chain (5.2.6)::

    le32 type; le32 reserved; le64 sector;    device-readable header (16 bytes)
    u8 data[];                                readable for OUT, writable for IN/GET_ID
    u8 status;                                the last device-writable byte

The device makes no assumption about how these are split into descriptors
(2.7.4 "Message Framing").  Types: IN (read), OUT (write), FLUSH, GET_ID (the
serial, 20 bytes, NUL-padded); anything else is VIRTIO_BLK_S_UNSUPP.  Data
moves between the backend and views of guest RAM (readv/writev: preadv and
pwritev straight into and out of the guest's buffers).  A request out of
range, of a length that is not a multiple of 512, or a write to a read-only
disk completes with VIRTIO_BLK_S_IOERR (5.2.6.1); a chain with no writable
byte for the status completes with 0 bytes written.  None of these stop the
device; only a broken virtqueue does.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pyvirt.backends.block import SECTOR, BlockBackend
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.queue import Chain, Span, SplitQueue, spans_len, split_spans

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
HEADER = struct.Struct("<IIQ")
SIZE_MAX = 1 << 20          # bytes per segment, as advertised
SEG_MAX = 126               # segments per request: the queue (256) less header and status...
QUEUE_SIZE = 256            # ...with room to spare for indirect tables
_CONFIG = struct.Struct("<QIIHBBI")


class VirtioBlk(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    num_queues = 1
    queue_max_size = QUEUE_SIZE

    def __init__(self, backend: BlockBackend, serial: str = "") -> None:
        super().__init__()
        self.backend = backend
        self.serial = serial.encode("utf-8", "replace")[:VIRTIO_BLK_ID_BYTES]
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "errors": 0,
                      "bytes_read": 0, "bytes_written": 0}

    def features(self) -> int:
        f = (super().features() | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX
             | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH)
        return f | VIRTIO_BLK_F_RO if self.backend.read_only else f

    def config(self) -> bytes:
        return _CONFIG.pack(self.backend.size // SECTOR, SIZE_MAX, SEG_MAX, 0, 0, 0, SECTOR)

    # -- requests -------------------------------------------------------------------------
    def process(self, index: int, queue: SplitQueue) -> None:
        while (chain := queue.pop()) is not None:
            queue.push(chain.head, self._serve(queue, chain))

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

    # -- state --------------------------------------------------------------------------------
    def save_device(self) -> dict[str, Any]:
        return {"backend": self.backend.save(), "serial": self.serial}

    def load_device(self, state: dict[str, Any]) -> None:
        self.backend.load(state["backend"])
        self.serial = state["serial"]
