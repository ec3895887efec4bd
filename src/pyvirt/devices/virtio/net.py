"""virtio-net (virtio 1.2, 5.1 "Network Device"): one receive and one transmit queue.

Queues (5.1.2): 0 receiveq1, 1 transmitq1.  No control queue, no multiqueue.

Features offered (5.1.3): VIRTIO_NET_F_MAC (the MAC address is in the
configuration space), VIRTIO_NET_F_STATUS (the link state is too),
VIRTIO_NET_F_MTU (1500) and VIRTIO_NET_F_MRG_RXBUF (a received frame may
span several receive buffers).  No checksum or segmentation offload is
offered (no VIRTIO_NET_F_CSUM, GUEST_CSUM, HOST_TSO*, GUEST_TSO*): the
driver sends complete frames with their checksums filled in, and receives
them so.

Configuration space (5.1.4)::

    u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu

Every buffer starts with the 12-byte header (5.1.6, the VERSION_1 layout)::

    u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size; le16 csum_start;
    le16 csum_offset; le16 num_buffers

Transmit (5.1.6.2): one chain is the header and one frame.

Both queues are served by `poll()` between every two CPU slices, so the
device asks the driver for no kicks (`SplitQueue.polled`: avail_event
kept behind the driver, or VIRTQ_USED_F_NO_NOTIFY): a kick would be an exit
from guest code for each frame sent or each batch of receive buffers.  The
one exception is a transmit queue quiet for TX_QUIET (2 ms): the next frame kicks,
goes out at once with a flush, and the queue is polled again (a ping's
request and reply otherwise waited for the end of a slice).  A kick that
comes anyway is served at once.  Frames sent are queued in the
back end and written together at the end of `poll()` (backends/net.py
`flush`): one system call, and one wake-up of passt or the switch, per
slice rather than per frame.  A frame shorter
than an Ethernet header (14 bytes), longer than 65535 bytes, a header asking
for an offload that was not offered, or a chain with device-writable buffers
is dropped and counted in `stats`; the chain is still returned to the driver.

Receive (5.1.6.3, 5.1.6.4): frames from the backend wait in a bounded queue
(`MAX_PENDING_FRAMES`, `MAX_PENDING_BYTES`) until `poll()` finds receive
buffers.  While `MAX_PENDING_FRAMES` wait, no more are taken from the back
end -- they stay in its socket, so passt (TCP flow control towards the host)
or the switch (its own bound per port) holds back, as QEMU stops reading its
netdev while the guest has no buffers; its descriptor is left out of the
idle wait meanwhile.  (Dropping them instead left a Debian guest receiving
with iperf3 at 0.24-0.40 MB/s, 2.7 with this: BENCHMARKS.md.)  A frame that would
pass `MAX_PENDING_BYTES` is dropped and counted.  With MRG_RXBUF a frame takes
as many buffers as it needs and the first header's `num_buffers` says how
many; without it a frame must fit in one buffer (5.1.6.3.1) or is dropped.
A frame that could never fit even in every buffer of the queue is dropped.

Rate limits (--net ...,tx_bw=,rx_bw=): a transmit chain refused by the tx
limiter goes back on the available ring; a received frame refused by the rx
limiter stays first in `pending` (so the bound on pending frames holds back
what the host sends beyond the rate).  `poll()` retries both; `next_deadline()`
says when, so an idle VM wakes up for them.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from typing import Any

from pyvirt.backends.net import MAX_FRAME, MIN_FRAME, NetBackend
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.queue import Chain, QueueError, SplitQueue
from pyvirt.ratelimit import RateLimiter
from pyvirt.state import Schema, blob, boolean, listof, record

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0

HDR = struct.Struct("<BBHHHHH")
HDR_SIZE = HDR.size                         # 12
RX, TX = 0, 1
QUEUE_SIZE = 256
MTU = 1500
MAX_PENDING_FRAMES = 256                    # frames from the host waiting for receive buffers
MAX_PENDING_BYTES = 2 << 20
POLL_FRAMES = 64                            # frames taken from the backend per poll
# Seconds without a frame to send before the transmit queue asks for a kick.  A guest receiving
# a stream sends an acknowledgement every few slices; a kick (an exit and a write to the back
# end) for each cost a Debian guest's iperf3 -R about a third of its rate.
TX_QUIET = 0.002
HDR_ONE_BUFFER = HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 1)    # a frame in one buffer


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; ValueError if malformed."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"invalid MAC address {text!r} (expected six hex pairs like 52:54:00:12:34:56)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"invalid MAC address {text!r}") from None


class VirtioNet(VirtioDevice):
    device_id = VIRTIO_ID_NET
    serves_host = True
    num_queues = 2
    queue_max_size = QUEUE_SIZE

    def __init__(self, backend: NetBackend, mac: bytes, tx_limiter: RateLimiter | None = None,
                 rx_limiter: RateLimiter | None = None) -> None:
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.backend = backend
        self.tx_limiter, self.rx_limiter = tx_limiter, rx_limiter
        self.mac = bytes(mac)
        self.link_up = backend.link_up
        self.stats = {"tx_frames": 0, "rx_frames": 0, "tx_dropped": 0, "rx_dropped": 0}
        super().__init__()
        for q in self.queues:
            q.polled = True                     # poll() serves both queues after every slice
        self.device_reset()

    def features(self) -> int:
        return (super().features() | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU
                | VIRTIO_NET_F_MRG_RXBUF)

    def config(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return self.mac + struct.pack("<HHH", status, 1, MTU)

    def device_reset(self) -> None:
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.tx_busy_at = 0.0                   # time.monotonic() of the last poll that sent

    # -- requests --------------------------------------------------------------------------
    def process(self, index: int, queue: SplitQueue) -> None:
        if index == TX:
            # The kick asked for after a quiet poll: the frame goes now, not at the end of
            # the slice, and the queue is polled again (no kick for the frames after it).
            queue.polled = True
            self._transmit(queue)
            self.backend.flush()
        else:
            self._deliver()

    def _transmit(self, queue: SplitQueue) -> None:
        done: list[tuple[int, int]] = []           # finished chains, put on the used ring together
        try:
            while (chain := queue.pop()) is not None:
                limiter = self.tx_limiter
                if limiter is not None and not limiter.consume(max(0, chain.readable_len - HDR_SIZE)):
                    queue.unpop()                       # throttled: poll() tries again
                    return
                frame = self._tx_frame(queue, chain)
                if frame is not None and not self.backend.send(frame):
                    queue.unpop()                       # the host is congested: try again in poll()
                    return
                done.append((chain.head, 0))
        finally:
            queue.push_many(done)

    def _tx_frame(self, queue: SplitQueue, chain: Chain) -> bytes | None:
        """The frame a transmit chain carries, or None (dropped and counted)."""
        n = chain.readable_len - HDR_SIZE
        if chain.writable or n < MIN_FRAME or n > MAX_FRAME:
            self.stats["tx_dropped"] += 1
            return None
        if len(chain.readable) == 1:                # header and frame in one buffer (Linux's way)
            bus = queue.bus
            ram, off = bus.ram, chain.readable[0][0] - bus.ram_base    # (_walk checked it is RAM)
            flags, gso_type = ram[off], ram[off + 1]
            frame = ram[off + HDR_SIZE:off + HDR_SIZE + n]
        else:
            data = queue.gather(chain.readable, chain.readable_len)
            flags, gso_type = data[0], data[1]
            frame = data[HDR_SIZE:]
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM or gso_type != VIRTIO_NET_HDR_GSO_NONE:
            self.stats["tx_dropped"] += 1             # offloads were never offered
            return None
        self.stats["tx_frames"] += 1
        return frame

    def _deliver(self) -> None:
        """Move waiting frames into the guest's receive buffers (5.1.6.4)."""
        q = self.queues[RX]
        if not q.ready or not self.pending:
            return
        sent = False
        mergeable = self.negotiated(VIRTIO_NET_F_MRG_RXBUF)
        pending = self.pending
        while pending:
            if self.rx_limiter is None and self._deliver_whole(q):
                sent = True
                if not pending:
                    break
            frame = pending[0]
            chains = self._rx_chains(q, HDR_SIZE + len(frame), mergeable)
            if chains is None:
                break                               # wait for the driver to post buffers
            if chains and self.rx_limiter is not None and not self.rx_limiter.consume(len(frame)):
                for _ in chains:
                    q.unpop()
                break                               # throttled: poll() tries again
            pending.popleft()
            self.pending_bytes -= len(frame)
            if not chains:
                self.stats["rx_dropped"] += 1        # cannot ever fit
                continue
            self._write_frame(q, chains, frame)
            sent = True
        q.publish_avail_event()                     # (polled: no kicks wanted for new buffers)
        if sent:
            self.signal_used(RX)

    def _deliver_whole(self, q: SplitQueue) -> bool:
        """The common case, in one loop: each waiting frame fits the next chain's first
        writable buffer (Linux posts buffers of at least an MTU's frame and header).  The
        used entries go on the ring together.  Stops at the first frame that does not
        (left to the general path) or when the driver has no more buffers; True if any went."""
        pending = self.pending
        bus = q.bus
        ram, base = bus.ram, bus.ram_base
        used: list[tuple[int, int]] = []
        spans: list[tuple[int, int]] = []
        nbytes = 0
        while pending:
            frame = pending[0]
            need = HDR_SIZE + len(frame)
            chain = q.pop()
            if chain is None:
                break
            addr, length = chain.writable[0] if chain.writable else (0, 0)
            if length < need:
                q.unpop()
                break
            off = addr - base                      # (_walk checked the buffer lies in RAM)
            ram[off:off + HDR_SIZE] = HDR_ONE_BUFFER
            ram[off + HDR_SIZE:off + need] = frame
            pending.popleft()
            nbytes += len(frame)
            used.append((chain.head, need))
            spans.append((addr, need))
        if not used:
            return False
        self.pending_bytes -= nbytes
        self.stats["rx_frames"] += len(used)
        bus.dma_written_spans(spans)
        q.push_many(used)
        return True

    def _rx_chains(self, q: SplitQueue, need: int, mergeable: bool) -> list[Chain] | None:
        """Chains enough for `need` bytes, popped; [] if the frame can never fit (drop it);
        None if the driver has not posted enough yet (nothing stays popped)."""
        chains: list[Chain] = []
        room = 0
        while room < need:
            chain = q.pop()
            if chain is None:
                for _ in chains:
                    q.unpop()
                return [] if len(chains) >= q.size else None
            if not mergeable and chain.writable_len < need:
                q.unpop()
                return []                           # one buffer per frame, and it is too small
            chains.append(chain)
            room += chain.writable_len
        return chains

    def _write_frame(self, q: SplitQueue, chains: list[Chain], frame: bytes) -> None:
        data = memoryview(HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, len(chains)) + frame)
        pos = 0
        for chain in chains:
            n = q.scatter(chain.writable, data[pos:pos + chain.writable_len])    # (no copy)
            q.push(chain.head, n)
            pos += n
        self.stats["rx_frames"] += 1

    # -- the host side ---------------------------------------------------------------------
    def _full(self) -> bool:
        """Frames wait for the guest up to the bound: take no more from the back end."""
        return self.live and len(self.pending) >= MAX_PENDING_FRAMES

    def _take_from_backend(self, live: bool) -> None:
        # Not live: drained and dropped (no busy wake-ups); live: no more than fit.
        pending = self.pending
        limit = min(POLL_FRAMES, MAX_PENDING_FRAMES - len(pending)) if live else POLL_FRAMES
        if limit <= 0:
            return
        for frame in self.backend.recv(limit):
            n = len(frame)
            if not live or not MIN_FRAME <= n <= MAX_FRAME or self.pending_bytes + n > MAX_PENDING_BYTES:
                self.stats["rx_dropped"] += 1
                continue
            pending.append(frame)
            self.pending_bytes += n

    def poll(self) -> None:
        """Between CPU slices: take frames from the host, deliver what fits, retry held-back
        transmissions, and report a change of link state."""
        live = self.live
        self._take_from_backend(live)
        if self.backend.link_up != self.link_up:
            self.link_up = self.backend.link_up
            self.config_changed()
            live = self.live
        if live:
            try:
                self._deliver()
                tx = self.queues[TX]
                if tx.ready and tx.has_work():
                    self._transmit(tx)
                    tx.polled = True
                    tx.publish_avail_event()
                    self.signal_used(TX)
                    self.tx_busy_at = time.monotonic()
                elif tx.ready and tx.polled and time.monotonic() - self.tx_busy_at >= TX_QUIET:
                    tx.polled = False               # quiet: the next frame kicks (see above)
                    tx.publish_avail_event()
            except QueueError as e:
                self.needs_reset(str(e))
            except Exception as e:                      # a device bug must not kill the VM
                log.exception("virtio-net: poll failed")
                self.needs_reset(f"internal error {e!r}")
        self.backend.flush()                       # what the guest sent during the slice goes now

    def next_deadline(self) -> int | None:
        """When a throttled frame (either direction) may go; None if none waits."""
        ticks = [t for lim in (self.tx_limiter, self.rx_limiter)
                 if lim is not None and (t := lim.wake_at()) is not None]
        return min(ticks) if ticks and self.live else None

    def fileno(self) -> int | None:
        return self.backend.fileno()

    def wait_fds(self) -> list[int]:
        fd = self.backend.fileno()
        return [] if fd is None or self._full() else [fd]

    def close(self) -> None:
        self.backend.close()

    def device_state_schema(self) -> Schema:
        return record({"pending": listof(blob(MAX_FRAME + HDR_SIZE), 0, MAX_PENDING_FRAMES),
                       "link_up": boolean})

    def save_device(self) -> dict[str, Any]:
        return {"pending": list(self.pending), "link_up": self.link_up}

    def load_device(self, state: dict[str, Any]) -> None:
        self.device_reset()
        for frame in state["pending"]:
            self.pending.append(bytes(frame))
            self.pending_bytes += len(frame)
        self.link_up = bool(state["link_up"])
