"""virtio-vsock driven by the mock driver: connections both ways, credit-based flow control,
the Unix socket host side, snapshots, and a hostile driver (bad headers, bad descriptors,
floods) that must not crash the VMM or grow its memory."""

from __future__ import annotations

import socket
import threading

import pytest

from pyvirt.backends.vsock import MAX_HANDSHAKES, UnixVsockBackend, connect_guest, parse_connect
from pyvirt.devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from pyvirt.devices.virtio.vsock import (
    BUF_ALLOC,
    CLOSE_TIMEOUT,
    HDR,
    HDR_SIZE,
    HOST_CID,
    MAX_GUEST_CONNECTIONS,
    MAX_HOST_CONNECTIONS,
    MAX_STRAY_RST,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    VIRTIO_ID_VSOCK,
    VirtioVsock,
)
from pyvirt.testing.virtio_rig import make_rig
from pyvirt.testing.virtq import F_NEXT

CID = 3


class FakeStream:
    def __init__(self, data: bytes = b"") -> None:
        self.inbox = bytearray(data)
        self.eof = False
        self.sent = bytearray()
        self.room = 1 << 30
        self.closed = self.shut = False

    def fileno(self) -> int:
        return -1 if self.closed else 99

    def recv(self, limit: int) -> bytes | None:
        if self.inbox:
            out = bytes(self.inbox[:limit])
            del self.inbox[:limit]
            return out
        return b"" if self.eof else None

    def send(self, data: bytes | bytearray | memoryview) -> int:
        n = min(len(data), self.room)
        self.sent += bytes(data[:n])
        self.room -= n
        return n

    def shutdown_write(self) -> None:
        self.shut = True

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    def __init__(self) -> None:
        self.incoming: list[tuple[FakeStream, int]] = []
        self.listening: dict[int, list[FakeStream]] = {}
        self.closed = False

    def accept(self) -> list[tuple[FakeStream, int]]:
        out, self.incoming = self.incoming, []
        return out

    def connect(self, port: int) -> FakeStream | None:
        if port not in self.listening:
            return None
        s = FakeStream()
        self.listening[port].append(s)
        return s

    def wait_fds(self) -> list[int]:
        return []

    def close(self) -> None:
        self.closed = True


def pkt(op: int, src_port: int, dst_port: int, data: bytes = b"", *, buf_alloc: int = 1 << 20,
        fwd_cnt: int = 0, flags: int = 0, src_cid: int = CID, dst_cid: int = HOST_CID,
        typ: int = TYPE_STREAM, length: int | None = None) -> bytes:
    return HDR.pack(src_cid, dst_cid, src_port, dst_port, len(data) if length is None else length,
                    typ, op, flags, buf_alloc, fwd_cnt) + data


class Guest:
    def __init__(self, backend: FakeBackend | UnixVsockBackend | None = None, rx_buffers: int = 32,
                 rx_size: int = 4096 + HDR_SIZE) -> None:
        self.backend = backend if backend is not None else FakeBackend()
        self.rig = make_rig(VirtioVsock(self.backend, CID), ram_size=16 << 20)
        self.dev: VirtioVsock = self.rig.device
        self.rx, self.tx, self.evt = self.rig.drv.init(queues=3)
        self.rx_bufs: dict[int, int] = {}
        self.rx_size = rx_size
        self.post_rx(rx_buffers)

    def post_rx(self, n: int) -> None:
        drv = self.rig.drv
        for _ in range(n):
            b = drv.buffer(self.rx_size, writable=True)
            self.rx_bufs[self.rx.add([b])] = b.addr
        drv.kick(0)

    def send(self, data: bytes, split: bool = True) -> None:
        drv = self.rig.drv
        bufs = [drv.buffer(data[:HDR_SIZE]), drv.buffer(data[HDR_SIZE:])] \
            if split and len(data) > HDR_SIZE else [drv.buffer(data)]
        self.tx.add(bufs)
        drv.kick(1)
        self.tx.used_entries()

    def received(self, repost: bool = True) -> list[tuple[tuple[int, ...], bytes]]:
        """(header fields, payload) of every packet the device put on the rx queue."""
        out = []
        for head, n in self.rx.used_entries():
            addr = self.rx_bufs.pop(head)
            raw = self.rig.bus.read_bytes(addr, n)
            if n >= HDR_SIZE:
                out.append((HDR.unpack(raw[:HDR_SIZE]), raw[HDR_SIZE:]))
            if repost:
                self.post_rx(1)
        return out

    def ops(self) -> list[int]:
        return [h[6] for h, _ in self.received()]

    def connect_from_host(self, port: int = 1234, data: bytes = b"") -> tuple[FakeStream, int]:
        """A host client asks for guest port `port`; the guest accepts."""
        assert isinstance(self.backend, FakeBackend)
        s = FakeStream(data)
        self.backend.incoming.append((s, port))
        self.dev.poll()
        (h, _), = self.received()
        assert h[:4] == (HOST_CID, CID, h[2], port) and h[6] == OP_REQUEST and h[5] == TYPE_STREAM
        host_port = h[2]
        self.send(pkt(OP_RESPONSE, port, host_port))
        assert bytes(s.sent) == b"OK %d\n" % host_port
        return s, host_port


def test_identity_and_config() -> None:
    g = Guest()
    assert g.dev.device_id == VIRTIO_ID_VSOCK == 19
    assert g.rig.drv.config_read(0, 8) == CID
    with pytest.raises(ValueError):
        VirtioVsock(FakeBackend(), guest_cid=2)


def test_host_connects_and_data_flows_both_ways() -> None:
    g = Guest()
    s, hp = g.connect_from_host(1234)
    s.sent.clear()
    s.inbox += b"hello guest"
    g.dev.poll()
    (h, data), = g.received()
    assert h[6] == OP_RW and h[4] == len(data) and data == b"hello guest"
    assert (h[2], h[3]) == (hp, 1234)
    g.send(pkt(OP_RW, 1234, hp, b"hello host"))
    assert bytes(s.sent) == b"hello host"
    s.eof = True                                         # the host client is done sending
    g.dev.poll()
    assert [(h[6], h[7]) for h, _ in g.received()] == [(OP_SHUTDOWN, SHUTDOWN_SEND)]
    g.send(pkt(OP_SHUTDOWN, 1234, hp, flags=SHUTDOWN_SEND | SHUTDOWN_RCV))
    assert g.ops() == [OP_RST] and s.closed and not g.dev.conns


def test_guest_connects_to_host_port() -> None:
    g = Guest()
    g.backend.listening[5000] = []
    g.send(pkt(OP_REQUEST, 40000, 5000))
    (h, _), = g.received()
    assert h[6] == OP_RESPONSE and (h[2], h[3]) == (5000, 40000) and h[8] == BUF_ALLOC
    g.send(pkt(OP_RW, 40000, 5000, b"x" * 100))
    assert bytes(g.backend.listening[5000][0].sent) == b"x" * 100
    g.send(pkt(OP_REQUEST, 40001, 5001))                 # nobody listens there
    (h, _), = g.received()
    assert h[6] == OP_RST and (h[2], h[3]) == (5001, 40001)
    g.send(pkt(OP_RST, 40000, 5000))
    assert g.backend.listening[5000][0].closed and not g.dev.conns


def test_host_to_guest_respects_guest_credit() -> None:
    g = Guest()
    s, hp = g.connect_from_host(7)
    g.send(pkt(OP_CREDIT_UPDATE, 7, hp, buf_alloc=1000, fwd_cnt=0))
    s.inbox += bytes(5000)
    g.dev.poll()
    got = sum(len(d) for _, d in g.received())
    assert got == 1000                                   # no more than the guest's buffer
    g.dev.poll()
    assert g.received() == []
    g.send(pkt(OP_CREDIT_UPDATE, 7, hp, buf_alloc=1000, fwd_cnt=1000))
    g.dev.poll()
    assert sum(len(d) for _, d in g.received()) == 1000


def test_guest_to_host_credit_updates_and_bounds() -> None:
    g = Guest()
    s, hp = g.connect_from_host(7)
    s.room = 0                                           # the host client reads nothing
    chunk = b"y" * 60000
    sent = 0
    while sent + len(chunk) <= BUF_ALLOC:
        g.send(pkt(OP_RW, 7, hp, chunk))
        sent += len(chunk)
    assert g.dev.conns and len(g.dev.conns[(7, hp)].out) == sent
    g.received()
    g.send(pkt(OP_RW, 7, hp, chunk))                     # beyond the credit it was given
    assert OP_RST in g.ops() and not g.dev.conns and s.closed
    assert g.dev.stats["resets"] == 1


def test_credit_update_sent_as_host_drains() -> None:
    g = Guest()
    s, hp = g.connect_from_host(7)
    g.received()
    for _ in range(2):
        g.send(pkt(OP_RW, 7, hp, b"z" * 50000))
    ups = [h for h, _ in g.received() if h[6] == OP_CREDIT_UPDATE]
    assert ups and ups[-1][9] == 100000 and ups[-1][8] == BUF_ALLOC
    g.send(pkt(OP_CREDIT_REQUEST, 7, hp))
    (h, _), = g.received()
    assert h[6] == OP_CREDIT_UPDATE and h[9] == 100000


@pytest.mark.parametrize("bad", [
    pkt(OP_RW, 7, 1, b"abc", src_cid=4),                  # spoofed source CID
    pkt(OP_RW, 7, 1, b"abc", dst_cid=5),                  # not to the host
    pkt(OP_RW, 7, 1, b"abc", length=10_000),              # longer than its buffers
    pkt(OP_RW, 7, 1, b"", length=0xFFFF_FFFF),
    pkt(42, 7, 1),                                        # unknown op
    pkt(OP_REQUEST, 7, 1, b"junk"),                       # payload on a control packet
    b"\x01" * 20,                                         # shorter than a header
])
def test_bad_headers_are_dropped_and_counted(bad: bytes) -> None:
    g = Guest()
    s, hp = g.connect_from_host(7)
    g.send(bad, split=False)
    assert g.dev.stats["bad_packets"] == 1 and g.dev.live
    g.send(pkt(OP_RW, 7, hp, b"still fine"))
    assert bytes(s.sent).endswith(b"still fine")
    assert g.rig.bus.stray == []


def test_unknown_type_and_connection_get_rst() -> None:
    g = Guest()
    g.send(pkt(OP_RW, 9, 9, b"?"))
    g.send(pkt(OP_REQUEST, 9, 10, typ=2))                 # SEQPACKET was never offered
    assert g.ops() == [OP_RST, OP_RST]
    g.send(pkt(OP_RST, 9, 11))                            # an RST is never answered
    assert g.ops() == []


def test_request_flood_is_bounded() -> None:
    g = Guest(rx_buffers=0)
    g.backend.listening.update({p: [] for p in range(2000)})
    for p in range(2000):
        g.send(pkt(OP_REQUEST, 50000, p))
        g.send(pkt(OP_RW, 60000, p, b"x"))               # RW to unknown connections: RSTs
    assert len(g.dev.conns) == MAX_GUEST_CONNECTIONS
    assert len(g.dev.stray_rst) == MAX_STRAY_RST
    g.post_rx(128)
    g.dev.poll()
    assert len(g.received()) == 128 and g.dev.live


def test_a_guest_holding_all_its_connections_does_not_lock_host_clients_out() -> None:
    """The CI failure of stop 14: a guest program filled every connection slot (to a host
    listener that never reads) and the agent's next connection from the host was refused."""
    g = Guest(rx_buffers=256)
    g.backend.listening[5000] = []
    for p in range(MAX_GUEST_CONNECTIONS + 10):
        g.send(pkt(OP_REQUEST, 40000 + p, 5000))
    assert sum(h[6] == OP_RESPONSE for h, _ in g.received()) == MAX_GUEST_CONNECTIONS
    s, hp = g.connect_from_host(1024, b"ping")           # the agent's port: still reachable
    g.send(pkt(OP_CREDIT_UPDATE, 1024, hp, buf_alloc=4096))
    g.dev.poll()
    assert [d for h, d in g.received() if h[6] == OP_RW] == [b"ping"]
    for p in range(MAX_HOST_CONNECTIONS - 1):            # host clients have their own bound
        g.backend.incoming.append((FakeStream(), 2000 + p))
    g.backend.incoming.append((extra := FakeStream(), 9999))
    g.dev.poll()
    assert extra.closed and sum(not c.from_guest for c in g.dev.conns.values()) == MAX_HOST_CONNECTIONS


def test_a_closed_connection_whose_host_peer_never_reads_is_reset_after_the_close_timeout() -> None:
    now = [100.0]
    g = Guest()
    g.dev.clock = lambda: now[0]
    g.backend.listening[5000] = []
    g.send(pkt(OP_REQUEST, 40000, 5000))
    peer = g.backend.listening[5000][0]
    peer.room = 0                                         # never reads
    g.send(pkt(OP_RW, 40000, 5000, b"d" * 1000))
    g.send(pkt(OP_SHUTDOWN, 40000, 5000, flags=SHUTDOWN_RCV | SHUTDOWN_SEND))
    g.received()
    now[0] += CLOSE_TIMEOUT - 1
    g.dev.poll()
    assert (40000, 5000) in g.dev.conns and not peer.closed   # its data may still go out
    now[0] += 2
    g.dev.poll()
    assert OP_RST in g.ops() and not g.dev.conns and peer.closed


def test_hostile_descriptors_break_only_the_queue() -> None:
    g = Guest()
    q = g.tx
    a = g.rig.drv.buffer(pkt(OP_RW, 1, 1))
    head = q._take(2)
    q.write_desc(head[0], a.addr, a.length, F_NEXT, head[1])
    q.write_desc(head[1], a.addr, a.length, F_NEXT, head[0])     # a loop
    q.publish(head[0])
    g.rig.drv.kick(1)
    assert g.rig.drv.status & STATUS_DEVICE_NEEDS_RESET
    g2 = Guest()
    g2.tx.write_desc(0, 0x1000, 64, 0, 0)                         # outside RAM
    g2.tx.publish(0)
    g2.rig.drv.kick(1)
    assert g2.rig.drv.status & STATUS_DEVICE_NEEDS_RESET
    assert g.rig.bus.stray == [] and g2.rig.bus.stray == []


def test_rx_queue_broken_in_poll_needs_reset_not_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    """Found by fuzz/targets.py's virtio_vsock: an rx ring whose available index runs far ahead
    raised QueueError out of `poll()`'s ring walk into its last line of defence (logged as an
    internal error with a traceback).  It is the guest's fault: the device needs a reset."""
    g = Guest(rx_buffers=0)
    g.send(pkt(OP_CREDIT_REQUEST, 9, 9))                 # an RST waits for an rx buffer
    assert len(g.dev.stray_rst) == 1
    g.rx.set_avail_idx(4139)                             # more entries than the queue has
    with caplog.at_level("WARNING", logger="pyvirt"):
        g.dev.poll()
    assert g.rig.drv.status & STATUS_DEVICE_NEEDS_RESET
    assert "available index" in g.dev.needs_reset_reason
    assert not [r for r in caplog.records if r.exc_info]
    assert g.rig.bus.stray == []


def test_tiny_rx_buffers_do_not_overflow() -> None:
    g = Guest(rx_buffers=4, rx_size=16)
    g.backend.incoming.append((FakeStream(), 5))
    g.dev.poll()
    assert [n for _, n in g.rx.used_entries()] == [0]    # a header does not fit: returned empty
    assert g.rig.bus.stray == []


def test_snapshot_resets_connections_and_sends_transport_reset() -> None:
    g = Guest()
    s, hp = g.connect_from_host(7)
    evt = g.rig.drv.buffer(4, writable=True)
    state = g.dev.save()
    g.dev.load(state)
    assert not g.dev.conns and s.closed
    g.evt.add([evt])
    g.rig.drv.kick(2)
    assert g.evt.used_entries() == [(0, 4)]
    assert g.rig.bus.read(evt.addr, 4) == 0              # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    g.send(pkt(OP_RW, 7, hp, b"late"))                   # the old connection is gone
    assert g.ops() == [OP_RST]


def test_device_reset_closes_connections() -> None:
    g = Guest()
    s, _ = g.connect_from_host(7)
    g.rig.drv.reset()
    assert s.closed and not g.dev.conns


# -- the Unix socket host side -----------------------------------------------------------------

def test_parse_connect() -> None:
    assert parse_connect(b"CONNECT 52") == 52
    for bad in (b"CONNECT", b"CONNECT -1", b"CONNECT 99999999999", b"connect 5", b"CONNECT 5 6"):
        assert parse_connect(bad) is None


def _serve(g: Guest, stop: threading.Event) -> None:
    while not stop.is_set():
        g.dev.poll()
        for h, data in g.received():
            if h[6] == OP_REQUEST:
                g.send(pkt(OP_RESPONSE, h[3], h[2]))
            elif h[6] == OP_RW:                          # an echo server in the guest
                g.send(pkt(OP_RW, h[3], h[2], data.upper()))
        stop.wait(0.002)


def test_unix_backend_end_to_end(tmp_path) -> None:
    path = tmp_path / "v.sock"
    g = Guest(UnixVsockBackend(path))
    stop = threading.Event()
    t = threading.Thread(target=_serve, args=(g, stop))
    t.start()
    try:
        s, hp = connect_guest(path, 1024)
        assert hp >= 1 << 30
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            got += s.recv(10)
        assert got == b"PING"
        s.close()
        bad = socket.socket(socket.AF_UNIX)
        bad.connect(str(path))
        bad.sendall(b"HELLO\n")                          # not a CONNECT line: dropped
        bad.settimeout(5)
        assert bad.recv(10) == b""
        bad.close()
    finally:
        stop.set()
        t.join()
        g.dev.close()
    assert not path.exists()


def test_unix_backend_guest_reaches_host_port(tmp_path) -> None:
    path = tmp_path / "v.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{path}_5000")
    listener.listen()
    g = Guest(UnixVsockBackend(path))
    try:
        g.send(pkt(OP_REQUEST, 777, 5000))
        assert g.ops() == [OP_RESPONSE]
        g.send(pkt(OP_RW, 777, 5000, b"from the guest"))
        c, _ = listener.accept()
        assert c.recv(100) == b"from the guest"
        c.close()
    finally:
        listener.close()
        g.dev.close()


def test_unix_backend_handshakes_are_bounded(tmp_path) -> None:
    path = tmp_path / "v.sock"
    b = UnixVsockBackend(path)
    clients = []
    try:
        for _ in range(MAX_HANDSHAKES + 8):
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            try:
                c.connect(str(path))
            except BlockingIOError:
                pass
            clients.append(c)
        for _ in range(3):
            b.accept()
        assert len(b.handshakes) <= MAX_HANDSHAKES
        clients[0].sendall(b"A" * 100)                   # a line that never ends
        b.accept()
        assert len(b.handshakes) < MAX_HANDSHAKES
    finally:
        for c in clients:
            c.close()
        b.close()
