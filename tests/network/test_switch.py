"""The learning switch, with plain sockets as ports: learning, flooding, no echo, malformed
input, a port that never reads, and separate networks.

"Port X received nothing" is checked with a barrier: a broadcast sent afterwards by another
port must be the next frame X sees (a port's frames are forwarded in order)."""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.network.switch import Switch, listen

BCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([0x52, 0x54, 0, 0, 0, n])


def frame(dst: bytes, src: bytes, payload: bytes = b"hello") -> bytes:
    return dst + src + b"\x88\xb5" + payload           # local experimental EtherType


class FakePort:
    def __init__(self, path: Path, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(str(path))
        self.sock.settimeout(5)
        self.buf = b""

    def send(self, f: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(f)) + f)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 5) -> bytes:
        self.sock.settimeout(timeout)
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    f, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return f
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data

    def closed_by_peer(self, timeout: float = 5) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


class Net:
    """A switch serving a socket in a thread."""

    def __init__(self, d: Path, name: str, **kw: object) -> None:
        self.path = d / f"{name}.sock"
        self.switch = Switch(listen(self.path), name=name, **kw)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.switch.serve_forever, daemon=True)
        self.thread.start()
        self.ports: list[FakePort] = []

    def port(self, **kw: object) -> FakePort:
        p = FakePort(self.path, **kw)  # type: ignore[arg-type]
        self.ports.append(p)
        return p

    def wait_ports(self, n: int) -> None:
        deadline = time.monotonic() + 5
        while len(self.switch.ports) != n:
            assert time.monotonic() < deadline, f"{len(self.switch.ports)} ports, not {n}"
            time.sleep(0.005)

    def close(self) -> None:
        for p in self.ports:
            p.close()
        self.switch.stop()
        self.thread.join(5)
        self.switch.listener.close()


@pytest.fixture
def nets() -> Iterator[list[Net]]:
    made: list[Net] = []
    yield made
    for n in made:
        n.close()


@pytest.fixture
def mknet(nets: list[Net]):
    d = Path(tempfile.mkdtemp(prefix="pvsw-"))        # short: Unix socket paths hold 107 bytes

    def make(name: str = "n", **kw: object) -> Net:
        net = Net(d, name, **kw)
        nets.append(net)
        return net

    yield make
    shutil.rmtree(d, ignore_errors=True)


def three(mknet, **kw: object) -> tuple[Net, FakePort, FakePort, FakePort]:
    net = mknet(**kw)
    a, b, c = net.port(), net.port(), net.port()
    net.wait_ports(3)
    return net, a, b, c


def test_broadcast_floods_to_all_others_and_never_echoes(mknet) -> None:
    _, a, b, c = three(mknet)
    f = frame(BCAST, mac(1), b"from a")
    a.send(f)
    assert b.recv() == f and c.recv() == f
    barrier = frame(BCAST, mac(2), b"barrier")
    b.send(barrier)
    assert a.recv() == barrier                          # not its own broadcast back


def test_unknown_unicast_floods(mknet) -> None:
    _, a, b, c = three(mknet)
    f = frame(mac(9), mac(1))
    a.send(f)
    assert b.recv() == f and c.recv() == f
    barrier = frame(BCAST, mac(2))
    b.send(barrier)
    assert a.recv() == barrier


def test_multicast_floods(mknet) -> None:
    _, a, b, c = three(mknet)
    f = frame(bytes.fromhex("01005e000001"), mac(1))
    a.send(f)
    assert b.recv() == f and c.recv() == f


def test_learned_unicast_goes_to_one_port_only(mknet) -> None:
    _, a, b, c = three(mknet)
    hello = frame(BCAST, mac(1))
    a.send(hello)                                       # the switch learns mac 1 -> a
    assert b.recv() == hello and c.recv() == hello
    to_a = frame(mac(1), mac(2), b"just for a")
    b.send(to_a)
    assert a.recv() == to_a
    barrier = frame(BCAST, mac(2), b"barrier")
    b.send(barrier)
    assert c.recv() == barrier                          # c never saw the unicast
    assert a.recv() == barrier


def test_unicast_to_the_senders_own_address_goes_nowhere(mknet) -> None:
    _, a, b, c = three(mknet)
    a.send(frame(BCAST, mac(1)))
    b.recv()
    c.recv()
    a.send(frame(mac(1), mac(1), b"to myself"))
    barrier = frame(BCAST, mac(2))
    b.send(barrier)
    assert a.recv() == barrier and c.recv() == barrier
    barrier2 = frame(BCAST, mac(3))
    c.send(barrier2)
    assert b.recv() == barrier2


def test_learned_addresses_age_out(mknet) -> None:
    _, a, b, c = three(mknet, aging=0.05)
    a.send(frame(BCAST, mac(1)))
    b.recv()
    c.recv()
    time.sleep(0.2)
    f = frame(mac(1), mac(2))
    b.send(f)
    assert a.recv() == f and c.recv() == f              # forgotten: flooded again


def test_a_port_that_leaves_is_forgotten(mknet) -> None:
    net, a, b, c = three(mknet)
    a.send(frame(BCAST, mac(1)))
    b.recv()
    c.recv()
    a.close()
    net.wait_ports(2)
    assert mac(1) not in net.switch.macs
    f = frame(mac(1), mac(2))
    b.send(f)
    assert c.recv() == f


@pytest.mark.parametrize("bad", [
    struct.pack(">I", 0),                                       # an empty frame
    struct.pack(">I", 10) + b"x" * 10,                          # shorter than an Ethernet header
    struct.pack(">I", 1 << 20) + b"x" * 100,                    # far too long
    struct.pack(">I", 0xFFFFFFFF),
], ids=["empty", "short", "long", "huge"])
def test_malformed_input_drops_only_that_port(mknet, bad: bytes) -> None:
    net, a, b, c = three(mknet)
    a.send(frame(BCAST, mac(1)))
    b.recv()
    c.recv()
    c.send_raw(bad)
    assert c.closed_by_peer()
    net.wait_ports(2)
    f = frame(mac(9), mac(2), b"still here")
    b.send(f)
    assert a.recv() == f
    g = frame(mac(2), mac(1))
    a.send(g)
    assert b.recv() == g


def test_largest_frame_passes(mknet) -> None:
    _, a, b, _ = three(mknet)
    f = frame(BCAST, mac(1), b"z" * (65535 - 14))
    a.send(f)
    assert b.recv() == f


def test_a_port_that_never_reads_does_not_hold_up_the_others(mknet) -> None:
    net = mknet(max_out=64 * 1024)
    a, b = net.port(), net.port()
    slow = net.port(rcvbuf=4096)
    net.wait_ports(3)
    n, payload = 1500, b"p" * 1400                     # 2.1 MB of broadcasts, far past what `slow` holds
    t0 = time.monotonic()
    for i in range(n):
        f = frame(BCAST, mac(1), i.to_bytes(4, "big") + payload)
        a.send(f)
        assert b.recv() == f                            # lockstep: b gets every frame, in order
    assert time.monotonic() - t0 < 30
    slow_port = next(p for p in net.switch.ports.values() if p.number == 3)
    assert slow_port.stats["tx_dropped"] > 0
    assert len(slow_port.out) <= 64 * 1024
    first = slow.recv()                                 # what it does get is the oldest frames
    assert first[14:18] == (0).to_bytes(4, "big")


def test_two_networks_do_not_see_each_others_frames(mknet) -> None:
    one, two = mknet("one"), mknet("two")
    a1, b1 = one.port(), one.port()
    a2, b2 = two.port(), two.port()
    one.wait_ports(2)
    two.wait_ports(2)
    f = frame(BCAST, mac(1), b"on one")
    a1.send(f)
    assert b1.recv() == f
    g = frame(BCAST, mac(3), b"on two")
    a2.send(g)
    assert b2.recv() == g                               # and not f
    barrier = frame(BCAST, mac(4))
    b2.send(barrier)
    assert a2.recv() == barrier
