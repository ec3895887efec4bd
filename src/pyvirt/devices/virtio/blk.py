"""virtio-blk (virtio 1.2, section 5.2).

Requests: a 16-byte header (type, reserved, sector), data buffers, and a
final status byte written by the device.  Reads and writes go between the
backend and guest RAM views with preadv/pwritev, no copies.  Malformed
requests complete with an error status; they never stop the device.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pyvirt.backends.block import SECTOR, BlockBackend
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.queue import Chain, SplitQueue

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID = 0, 1, 4, 8
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP = 0, 1, 2
ID_BYTES = 20
SIZE_MAX = 1 << 20
SEG_MAX = 126
_HDR = struct.Struct("<IIQ")


class VirtioBlk(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    num_queues = 1

    def __init__(self, backend: BlockBackend, serial: str = "") -> None:
        super().__init__()
        self.backend = backend
        self.serial = serial.encode()[:ID_BYTES]
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "errors": 0}

    def features(self) -> int:
        f = super().features() | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE \
            | VIRTIO_BLK_F_FLUSH
        return f | VIRTIO_BLK_F_RO if self.backend.read_only else f

    def config(self) -> bytes:
        # capacity, size_max, seg_max, geometry (c/h/s), blk_size
        return struct.pack("<QIIHBBI", self.backend.size // SECTOR, SIZE_MAX, SEG_MAX, 0, 0, 0, SECTOR)

    def process(self, index: int, queue: SplitQueue) -> bool:
        notify = False
        while True:
            chain = queue.pop()
            if chain is None:
                return notify
            written = self._serve(queue, chain)
            notify |= queue.push(chain, written)

    def _serve(self, queue: SplitQueue, chain: Chain) -> int:
        if not chain.writable or chain.readable_len < _HDR.size:
            self.stats["errors"] += 1
            return 0                                  # no room for a status byte: nothing to say
        status_addr, status_len = chain.writable[-1]
        data_in = chain.writable[:-1]
        if status_len > 1:
            data_in = chain.writable[:-1] + [(status_addr, status_len - 1)]
        status_addr += status_len - 1
        kind, _, sector = _HDR.unpack(queue.gather(chain.readable, _HDR.size))
        data_out = self._skip(chain.readable, _HDR.size)
        status, written = self._request(queue, kind, sector, data_in, data_out)
        queue.bus.write(status_addr, 1, status)
        if status != VIRTIO_BLK_S_OK:
            self.stats["errors"] += 1
        return written + 1

    @staticmethod
    def _skip(bufs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
        out = []
        for a, length in bufs:
            if n >= length:
                n -= length
                continue
            out.append((a + n, length - n))
            n = 0
        return out

    def _request(self, queue: SplitQueue, kind: int, sector: int, data_in: list[tuple[int, int]],
                 data_out: list[tuple[int, int]]) -> tuple[int, int]:
        backend = self.backend
        if kind == VIRTIO_BLK_T_IN:
            length = sum(n for _, n in data_in)
            if length % SECTOR or sector * SECTOR + length > backend.size:
                return VIRTIO_BLK_S_IOERR, 0
            views = queue.views(data_in)
            try:
                backend.readinto(sector * SECTOR, views)
            except OSError as e:
                log.warning("disk read failed: %s", e)
                return VIRTIO_BLK_S_IOERR, 0
            for a, n in data_in:
                queue.bus.dma_written(a, n)
            self.stats["reads"] += 1
            return VIRTIO_BLK_S_OK, length
        if kind == VIRTIO_BLK_T_OUT:
            length = sum(n for _, n in data_out)
            if backend.read_only or length % SECTOR or sector * SECTOR + length > backend.size:
                return VIRTIO_BLK_S_IOERR, 0
            try:
                backend.write(sector * SECTOR, queue.views(data_out))
            except OSError as e:
                log.warning("disk write failed: %s", e)
                return VIRTIO_BLK_S_IOERR, 0
            self.stats["writes"] += 1
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_FLUSH:
            try:
                backend.flush()
            except OSError:
                return VIRTIO_BLK_S_IOERR, 0
            self.stats["flushes"] += 1
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(ID_BYTES, b"\0")
            return VIRTIO_BLK_S_OK, queue.scatter(data_in, ident)
        return VIRTIO_BLK_S_UNSUPP, 0

    def save(self) -> dict[str, Any]:
        return super().save()
