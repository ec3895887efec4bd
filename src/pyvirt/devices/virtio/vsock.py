"""virtio-vsock (virtio 1.2, 5.10 "Socket Device"): stream sockets between guest and host.

Queues (5.10.2): 0 rx (device to driver), 1 tx (driver to device), 2 event.
Configuration space (5.10.4): ``le64 guest_cid``.  No feature bits beyond the
transport's (no VIRTIO_VSOCK_F_SEQPACKET): stream sockets only.

Every packet starts with the 44-byte header (5.10.6)::

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port; le32 len;
    le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt

A connection is named by (guest port, host port).  The host side is a
`VsockBackend` (backends/vsock.py: Firecracker's Unix socket scheme); this
module knows only its `HostStream`s.

Flow control (5.10.6.3): each side tells the other its receive buffer
(`buf_alloc`) and how much of it it has consumed (`fwd_cnt`); a sender keeps
``tx_cnt - peer_fwd_cnt <= peer_buf_alloc``.  Here each connection buffers at
most `BUF_ALLOC` bytes from the guest not yet taken by the host socket, so
all connections together hold at most
``(MAX_GUEST_CONNECTIONS + MAX_HOST_CONNECTIONS) * BUF_ALLOC``;
data for the guest is read from the host socket only when the guest has
credit and a receive buffer for it, straight into that buffer.

Every header field from the guest is checked: a packet shorter than a
header, with a length beyond its buffers or `MAX_PKT_DATA`, from another
CID than the guest's, to another CID than the host's, or of an unknown type
or op is dropped and counted (`stats`); a connection whose guest side sends
more than its credit allows is reset.  Control replies (RST to unknown
connections) wait in a bounded queue (`MAX_STRAY_RST`).

Connections the guest opens and connections host clients open have separate
budgets, so a guest program that opens all it may (to a host listener that
never reads) cannot lock host clients, the guest agent among them, out of
the guest.  A connection the guest has closed in both directions while its
data still waits for a host peer that does not read is reset after
`CLOSE_TIMEOUT`, as Linux does on its side, so it does not hold its slot
for ever.

Snapshots: connections are host sockets and are not saved.  After a restore
the device behaves as if reset under the driver: it sends
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (5.10.6.6), so the
guest resets its connected sockets (listening ones stay) and host clients
connect again.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.queue import Chain, QueueError, SplitQueue
from pyvirt.state import Schema, boolean, record

log = logging.getLogger(__name__)

VIRTIO_ID_VSOCK = 19
HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size                          # 44
RX, TX, EVT = 0, 1, 2
QUEUE_SIZE = 256

HOST_CID = 2
DEFAULT_GUEST_CID = 3
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
EVENT_TRANSPORT_RESET = 0

BUF_ALLOC = 256 * 1024                       # our receive buffer per connection (guest -> host)
MAX_GUEST_CONNECTIONS = 64                   # opened by the guest
MAX_HOST_CONNECTIONS = 64                    # opened by host clients: 32 MiB buffered at most in all
MAX_PKT_DATA = 64 * 1024                     # Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE
MAX_STRAY_RST = 256
CONNECT_TIMEOUT = 5.0                        # seconds the guest has to answer a host REQUEST
CLOSE_TIMEOUT = 8.0                          # seconds a closed connection's data may wait (Linux's too)
FIRST_HOST_PORT = 1 << 30                    # host ports given to host-initiated connections
M32 = 0xFFFF_FFFF


class Stream(Protocol):
    def fileno(self) -> int: ...
    def recv(self, limit: int) -> bytes | None: ...
    def send(self, data: bytes | bytearray | memoryview) -> int: ...
    def shutdown_write(self) -> None: ...
    def close(self) -> None: ...


class VsockBackend(Protocol):
    def accept(self) -> list[tuple[Any, int]]: ...
    def connect(self, port: int) -> Any: ...
    def wait_fds(self) -> list[int]: ...
    def close(self) -> None: ...


class NullVsockBackend:
    """No host side: nobody connects in, and the guest reaches no host port."""

    def accept(self) -> list[tuple[Any, int]]:
        return []

    def connect(self, port: int) -> Any:
        return None

    def wait_fds(self) -> list[int]:
        return []

    def close(self) -> None:
        pass


@dataclass
class Conn:
    guest_port: int
    host_port: int
    stream: Stream
    established: bool
    since: float
    out: bytearray = field(default_factory=bytearray)   # from the guest, not yet on the host socket
    rx_cnt: int = 0               # bytes received from the guest (what its tx_cnt should be)
    fwd_cnt: int = 0              # of those, bytes handed to the host socket
    fwd_told: int = 0             # fwd_cnt as last told to the guest
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0               # bytes sent to the guest
    host_eof: bool = False        # the host side sent everything it will
    guest_shut: int = 0           # SHUTDOWN flags from the guest
    ctrl: list[tuple[int, int]] = field(default_factory=list)   # (op, flags) to send, in order
    closing: bool = False         # RST once `out` is flushed
    from_guest: bool = False      # the guest opened it (counts against MAX_GUEST_CONNECTIONS)
    closing_since: float = 0.0    # when the guest closed it with data still in `out`

    def credit(self) -> int:
        """Bytes the guest can still take on this connection."""
        used = (self.tx_cnt - self.peer_fwd_cnt) & M32
        return max(0, self.peer_buf_alloc - used) if used <= self.peer_buf_alloc else 0

    def want(self, op: int, flags: int = 0) -> None:
        if (op, flags) not in self.ctrl:
            self.ctrl.append((op, flags))


class VirtioVsock(VirtioDevice):
    serves_host = True
    device_id = VIRTIO_ID_VSOCK
    num_queues = 3
    queue_max_size = QUEUE_SIZE

    def __init__(self, backend: VsockBackend, guest_cid: int = DEFAULT_GUEST_CID,
                 ticks: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 3 <= guest_cid < M32:
            raise ValueError(f"guest CID {guest_cid} must be 3 or more (0-2 are reserved)")
        self.backend = backend
        self.guest_cid = guest_cid
        self.ticks = ticks
        self.clock = clock
        self.stats = {"bad_packets": 0, "resets": 0, "refused": 0, "rx_bytes": 0, "tx_bytes": 0}
        self.conns: OrderedDict[tuple[int, int], Conn] = OrderedDict()
        self.stray_rst: deque[tuple[int, int]] = deque()
        self.next_host_port = FIRST_HOST_PORT
        self.reset_event_due = False
        super().__init__()

    def config(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    # -- connections --------------------------------------------------------------------------
    def _drop_all(self) -> None:
        for c in self.conns.values():
            c.stream.close()
        self.conns.clear()
        self.stray_rst.clear()

    def device_reset(self) -> None:
        self._drop_all()

    def _close(self, c: Conn, rst: bool) -> None:
        """End a connection; with `rst` the guest is told by an RST first."""
        c.stream.close()
        c.out.clear()
        if rst:
            c.ctrl = [(OP_RST, 0)]
            c.closing = True
        else:
            self.conns.pop((c.guest_port, c.host_port), None)

    def _rst_stray(self, guest_port: int, host_port: int) -> None:
        if len(self.stray_rst) < MAX_STRAY_RST:
            self.stray_rst.append((guest_port, host_port))

    # -- the driver's packets (tx queue) ---------------------------------------------------------
    def process(self, index: int, queue: SplitQueue) -> None:
        if index == TX:
            while (chain := queue.pop()) is not None:
                self._tx_packet(queue, chain)
                queue.push(chain.head, 0)
            self._flush_out()
        self._fill_rx()
        self._send_event()

    def _tx_packet(self, queue: SplitQueue, chain: Chain) -> None:
        if chain.readable_len < HDR_SIZE:
            self.stats["bad_packets"] += 1
            return
        (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
         fwd_cnt) = HDR.unpack(queue.gather(chain.readable, HDR_SIZE))
        if (src_cid != self.guest_cid or dst_cid != HOST_CID or length > MAX_PKT_DATA
                or length > chain.readable_len - HDR_SIZE or not OP_REQUEST <= op <= OP_CREDIT_REQUEST
                or (length and op != OP_RW)):
            self.stats["bad_packets"] += 1
            return
        key = (src_port, dst_port)
        c = self.conns.get(key)
        if typ != TYPE_STREAM:
            self.stats["bad_packets"] += 1
            if op != OP_RST:
                self._rst_stray(src_port, dst_port)
            return
        if c is None or c.closing:
            if op == OP_REQUEST and c is None:
                self._guest_connects(src_port, dst_port, buf_alloc, fwd_cnt)
            elif op != OP_RST and c is None:
                self._rst_stray(src_port, dst_port)
            return
        c.peer_buf_alloc, c.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_RST:
            self._close(c, rst=False)
        elif op == OP_REQUEST:
            self._close(c, rst=True)                         # a second REQUEST on a live connection
        elif op == OP_RESPONSE:
            if c.established:
                self._close(c, rst=True)
            else:
                c.established = True
                if c.stream.send(b"OK %d\n" % c.host_port) <= 0:
                    self._close(c, rst=True)
        elif not c.established:
            self._close(c, rst=True)                         # anything else before the RESPONSE
        elif op == OP_RW:
            self._guest_data(queue, chain, c, length)
        elif op == OP_SHUTDOWN:
            c.guest_shut |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            if c.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND:
                c.closing = True                             # RST once the data is out
                c.closing_since = self.clock()
            elif c.guest_shut & SHUTDOWN_SEND and not c.out:
                c.stream.shutdown_write()
        elif op == OP_CREDIT_REQUEST:
            c.want(OP_CREDIT_UPDATE)
        # OP_CREDIT_UPDATE: the header fields above were all it carried

    def _count(self, from_guest: bool) -> int:
        return sum(1 for c in self.conns.values() if c.from_guest == from_guest)

    def _guest_connects(self, guest_port: int, host_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        if self._count(from_guest=True) >= MAX_GUEST_CONNECTIONS:
            self.stats["refused"] += 1
            self._rst_stray(guest_port, host_port)
            return
        stream = self.backend.connect(host_port)
        if stream is None:
            self.stats["refused"] += 1
            self._rst_stray(guest_port, host_port)
            return
        c = Conn(guest_port, host_port, stream, True, self.clock(),
                 peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt, from_guest=True)
        c.want(OP_RESPONSE)
        self.conns[(guest_port, host_port)] = c

    def _guest_data(self, queue: SplitQueue, chain: Chain, c: Conn, length: int) -> None:
        if c.guest_shut & SHUTDOWN_SEND:
            self._close(c, rst=True)                         # data after "no more data"
            return
        if len(c.out) + length > BUF_ALLOC or (c.rx_cnt - c.fwd_cnt) & M32 > BUF_ALLOC - length:
            self.stats["resets"] += 1                        # beyond the credit it was given
            self._close(c, rst=True)
            return
        data = queue.gather(chain.readable, HDR_SIZE + length)[HDR_SIZE:]
        c.out += data
        c.rx_cnt = (c.rx_cnt + length) & M32
        self.stats["tx_bytes"] += length

    # -- the host side ---------------------------------------------------------------------------
    def _flush_out(self) -> None:
        for c in list(self.conns.values()):
            if c.closing and c.ctrl == [(OP_RST, 0)] and c.stream.fileno() < 0:
                continue                                     # only the RST is left to send
            if c.out:
                n = c.stream.send(c.out)
                if n < 0:
                    self._close(c, rst=True)
                    continue
                del c.out[:n]
                c.fwd_cnt = (c.fwd_cnt + n) & M32
            if (c.fwd_cnt - c.fwd_told) & M32 >= BUF_ALLOC // 4:
                c.want(OP_CREDIT_UPDATE)
            if not c.out:
                if c.closing:
                    self._close(c, rst=True)
                elif c.guest_shut & SHUTDOWN_SEND:
                    c.stream.shutdown_write()

    def _accept(self) -> None:
        for stream, port in self.backend.accept():
            if not self.live or self._count(from_guest=False) >= MAX_HOST_CONNECTIONS:
                self.stats["refused"] += 1
                stream.close()
                continue
            host_port = self._free_host_port(port)
            c = Conn(port, host_port, stream, False, self.clock())
            c.want(OP_REQUEST)
            self.conns[(port, host_port)] = c

    def _free_host_port(self, guest_port: int) -> int:
        while True:
            p = self.next_host_port
            self.next_host_port = p + 1 if p + 1 <= M32 else FIRST_HOST_PORT
            if (guest_port, p) not in self.conns:
                return p

    def _expire(self) -> None:
        now = self.clock()
        for c in list(self.conns.values()):
            if not c.established and not c.closing and now - c.since > CONNECT_TIMEOUT:
                self._close(c, rst=True)
            elif c.closing and c.out and now - c.closing_since > CLOSE_TIMEOUT:
                self._close(c, rst=True)                     # the host peer never took its data

    # -- packets for the driver (rx queue) --------------------------------------------------------
    def _header(self, c: Conn | None, guest_port: int, host_port: int, op: int, flags: int = 0,
                length: int = 0) -> bytes:
        buf, fwd = (BUF_ALLOC, c.fwd_cnt) if c is not None else (0, 0)
        if c is not None:
            c.fwd_told = fwd
        return HDR.pack(HOST_CID, self.guest_cid, host_port, guest_port, length, TYPE_STREAM, op,
                        flags, buf, fwd)

    def _fill_rx(self) -> None:
        q = self.queues[RX]
        if not self.live or not q.ready or q.broken:
            return
        sent = False
        while self.stray_rst:
            chain = q.pop()
            if chain is None:
                break
            gp, hp = self.stray_rst.popleft()
            self._put(q, chain, self._header(None, gp, hp, OP_RST))
            sent = True
        sent = self._send_ctrl(q) or sent
        budget = q.size
        active = True
        while active and budget > 0:
            active = False
            for c in list(self.conns.values()):
                if not c.established or c.closing or c.host_eof or c.ctrl or c.credit() == 0:
                    continue
                chain = q.pop()
                if chain is None:
                    budget = 0
                    break
                room = min(chain.writable_len - HDR_SIZE, c.credit(), MAX_PKT_DATA)
                if room <= 0:
                    self._put(q, chain, b"")                 # too small to be used: given back empty
                    sent = True
                    continue
                data = c.stream.recv(room)
                if data is None:
                    q.unpop()
                    continue
                if not data:
                    q.unpop()
                    c.host_eof = True
                    c.want(OP_SHUTDOWN, SHUTDOWN_SEND)
                    active = True
                    continue
                self._put(q, chain, self._header(c, c.guest_port, c.host_port, OP_RW, 0, len(data))
                          + data)
                c.tx_cnt = (c.tx_cnt + len(data)) & M32
                self.stats["rx_bytes"] += len(data)
                sent = True
                active = True
                budget -= 1
        sent = self._send_ctrl(q) or sent                # SHUTDOWNs just queued
        q.publish_avail_event()
        if sent:
            self.signal_used(RX)

    def _send_ctrl(self, q: SplitQueue) -> bool:
        """Each connection's control packets, in order, while the driver has buffers."""
        sent = False
        for c in list(self.conns.values()):
            while c.ctrl:
                chain = q.pop()
                if chain is None:
                    return sent
                op, flags = c.ctrl.pop(0)
                self._put(q, chain, self._header(c, c.guest_port, c.host_port, op, flags))
                sent = True
                if op == OP_RST:
                    self.conns.pop((c.guest_port, c.host_port), None)
        return sent

    @staticmethod
    def _put(q: SplitQueue, chain: Chain, packet: bytes) -> None:
        n = q.scatter(chain.writable, packet) if chain.writable_len >= len(packet) else 0
        q.push(chain.head, n)

    def _send_event(self) -> None:
        q = self.queues[EVT]
        if not self.reset_event_due or not self.live or not q.ready or q.broken:
            return
        chain = q.pop()
        if chain is None:
            return
        n = q.scatter(chain.writable, struct.pack("<I", EVENT_TRANSPORT_RESET)) \
            if chain.writable_len >= 4 else 0
        q.push(chain.head, n)
        self.reset_event_due = False
        self.signal_used(EVT)

    # -- the run loop ----------------------------------------------------------------------------
    def poll(self) -> None:
        """Between CPU slices: new host clients, data both ways, time-outs, the reset event."""
        try:
            self._accept()
            if not self.live:
                return
            self._expire()
            self._flush_out()
            self._fill_rx()
            self._send_event()
        except QueueError as e:                          # the guest broke a queue's rules
            self.needs_reset(str(e))
        except Exception as e:                           # a device bug must not kill the VM
            log.exception("virtio-vsock: poll failed")
            self.needs_reset(f"internal error {e!r}")

    def wait_fds(self) -> list[int]:
        """Descriptors whose input the device can use now (no busy wake-ups: a connection the
        guest has no credit or buffer for is left out)."""
        fds = list(self.backend.wait_fds())
        if self.live:
            fds += [c.stream.fileno() for c in self.conns.values()
                    if c.established and not c.closing and not c.host_eof and c.credit() > 0
                    and c.stream.fileno() >= 0]
        return fds

    def next_deadline(self) -> int | None:
        """Soon, while output waits for a full host socket or a connection waits for the
        guest's answer (both are retried by `poll()`)."""
        if self.ticks is None or not self.live:
            return None
        if any(c.out or not c.established for c in self.conns.values()):
            return self.ticks() + 100_000                # 10 ms at the 10 MHz timebase
        return None

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        self._drop_all()
        self.backend.close()

    # -- state -----------------------------------------------------------------------------------
    def device_state_schema(self) -> Schema:
        return record({"reset_event_due": boolean})

    def save_device(self) -> dict[str, Any]:
        return {"reset_event_due": self.reset_event_due}

    def load_device(self, state: dict[str, Any]) -> None:
        """Connections are host sockets and are gone: reset them as a device reset would and
        tell the driver (TRANSPORT_RESET on the event queue)."""
        self._drop_all()
        self.reset_event_due = True
