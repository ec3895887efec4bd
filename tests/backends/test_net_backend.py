"""Network backends: -netdev stream framing over a socket pair, passt started and stopped (and
its failures), and a TAP interface (where the host lets us make one)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest

from pyvirt.backends.net import FLUSH_AT, MAX_OUT, PasstBackend, StreamBackend, TapBackend
from pyvirt.errors import ConfigError

MAC = bytes.fromhex("525400123456")


def frame(n: int, seed: int = 0) -> bytes:
    return (b"\xff" * 6 + MAC + b"\x08\x00" + bytes((seed + i) & 0xFF for i in range(n)))[:n]


def framed(f: bytes) -> bytes:
    return struct.pack(">I", len(f)) + f


def recv_until(backend, count: int, timeout: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += backend.recv(64)
        if len(got) < count:
            time.sleep(0.005)
    return got


@pytest.fixture
def pair():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = StreamBackend(ours)
    yield backend, peer
    backend.close()
    peer.close()


def test_stream_frames_both_ways(pair) -> None:
    backend, peer = pair
    assert backend.send(frame(60, 1)) and backend.send(frame(1514, 2))
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):             # queued until the flush: one write for both
        peer.recv(65536)
    backend.flush()
    peer.settimeout(5)
    want = framed(frame(60, 1)) + framed(frame(1514, 2))
    got = b""
    while len(got) < len(want):
        got += peer.recv(65536)
    assert got == want
    peer.sendall(framed(frame(100, 3)) + framed(frame(42, 4)))
    assert recv_until(backend, 2) == [frame(100, 3), frame(42, 4)]
    assert backend.fileno() is not None and backend.link_up


def test_stream_send_writes_once_flush_at_bytes_wait(pair) -> None:
    backend, peer = pair
    big = frame(1514, 7)
    count = FLUSH_AT // (len(big) + 4) + 1          # the last send crosses FLUSH_AT
    for _ in range(count - 1):
        assert backend.send(big)
    assert len(backend.out) == (count - 1) * (len(big) + 4)
    assert backend.send(big)
    assert backend.out == bytearray()                # written without a flush()
    peer.settimeout(5)
    got = b""
    while len(got) < count * (len(big) + 4):
        got += peer.recv(1 << 20)
    assert got == framed(big) * count


def test_stream_split_writes(pair) -> None:
    backend, peer = pair
    data = framed(frame(300, 5)) + framed(b"") + framed(frame(65535, 6))
    got: list[bytes] = []
    for i in range(0, len(data), 7):                  # the length prefix itself is split too
        peer.sendall(data[i:i + 7])
        got += backend.recv(8)
        if i + 7 < 4 + 300:
            assert got == []                          # nothing before the whole first frame
    got += recv_until(backend, 2 - len(got))
    assert got == [frame(300, 5), frame(65535, 6)]
    assert backend.stats["rx_empty"] == 1             # the empty frame is skipped


def test_stream_oversize_length_drops_connection(pair, caplog: pytest.LogCaptureFixture) -> None:
    backend, peer = pair
    peer.sendall(framed(frame(60)) + struct.pack(">I", 65536) + b"x" * 100)
    with caplog.at_level(logging.WARNING):
        got = recv_until(backend, 1)
        for _ in range(3):
            backend.recv(8)
    assert got == [frame(60)]
    assert backend.stats["rx_frames"] == 1            # the frame before it is counted, as returned
    assert not backend.link_up and backend.fileno() is None
    assert "65536-byte frame" in caplog.text
    assert backend.send(frame(60))                    # dropped, never an exception
    assert backend.stats["tx_dropped"] == 1


def test_stream_eof_puts_link_down(pair) -> None:
    backend, peer = pair
    peer.sendall(framed(frame(60))[:10])              # half a frame, then the peer leaves
    peer.close()
    recv_until(backend, 1, timeout=0.2)
    assert not backend.link_up
    assert backend.recv(8) == [] and backend.send(frame(60))


def test_stream_back_pressure(pair) -> None:
    backend, peer = pair
    big = frame(65535)
    sent = 0
    while backend.send(big):                          # the peer reads nothing
        sent += 1
        assert sent < 10 * MAX_OUT // len(big)
    assert len(backend.out) >= MAX_OUT
    peer.settimeout(5)
    total = 0
    while total < sent * (len(big) + 4):               # drain what was accepted
        total += len(peer.recv(1 << 20))
        backend.recv(1)                               # flushes the rest
    assert total == sent * (len(big) + 4)
    assert backend.send(big)


def test_stream_connect_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot connect to network socket"):
        StreamBackend.connect(tmp_path / "nobody-listens.sock")


def test_stream_connect_to_a_listener(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    backend = StreamBackend.connect(path)
    conn, _ = server.accept()
    try:
        conn.sendall(framed(frame(64, 8)))
        assert recv_until(backend, 1) == [frame(64, 8)]
    finally:
        backend.close()
        conn.close()
        server.close()


# -- passt ------------------------------------------------------------------------------------
needs_passt = pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_passt_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^passt is not installed \(scripts/setup-system.sh installs it\)$"):
        PasstBackend()


def test_passt_failing_to_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "passt"
    fake.write_text("#!/bin/sh\necho 'Failed to send 10 bytes to syslog' >&2\necho 'no good' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="^passt failed to start: no good$"):
        PasstBackend()


def test_passt_host_port_in_use() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"host port {port} on 127.0.0.1 is already in use"):
            PasstBackend([(port, 80)])
    finally:
        busy.close()


def arp_request(target: bytes) -> bytes:
    """Who has `target`? (from MAC, 10.77.0.2)"""
    arp = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC, bytes([10, 77, 0, 2]), bytes(6), target)
    return b"\xff" * 6 + MAC + b"\x08\x06" + arp


@needs_passt
def test_passt_serves_and_forwards_ports() -> None:
    port = free_port()
    backend = PasstBackend([(port, 80)])
    proc, workdir = backend.proc, backend.dir
    try:
        assert backend.link_up and proc is not None and proc.poll() is None
        probe = socket.create_connection(("127.0.0.1", port), timeout=5)   # passt listens
        probe.close()
        # passt answers ARP for any address but the guest's own
        assert backend.send(arp_request(bytes([10, 77, 0, 1])))
        deadline = time.monotonic() + 5
        replies: list[bytes] = []
        while time.monotonic() < deadline and not replies:
            replies = [f for f in backend.recv(16) if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02"]
            time.sleep(0.01)
        assert replies, "no ARP reply from passt"
        assert replies[0][:6] == MAC and replies[0][38:42] == bytes([10, 77, 0, 2])
    finally:
        backend.close()
    assert proc.poll() is not None                    # stopped and reaped
    assert not workdir.exists()
    s = socket.socket()
    s.bind(("127.0.0.1", port))                       # the forwarded port is free again
    s.close()


# -- TAP ----------------------------------------------------------------------------------------
def test_tap_bad_name() -> None:
    with pytest.raises(ConfigError, match="invalid TAP interface name"):
        TapBackend("x" * 20)


def test_tap_frames_both_ways() -> None:
    name = f"pyvt{os.getpid() % 100000}"
    try:
        tap = TapBackend(name)
    except ConfigError as e:
        assert "needs root or CAP_NET_ADMIN" in str(e) or "cannot open /dev/net/tun" in str(e)
        pytest.skip(str(e))
    raw = None
    try:
        assert tap.fileno() is not None
        assert tap.send(frame(60)) and tap.stats["tx_dropped"] == 1    # interface down: lost
        if os.system(f"ip link set {name} up 2>/dev/null") != 0:
            pytest.skip("cannot bring the TAP interface up")
        # A packet socket on the interface plays the host side: no addresses, nothing routed.
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        raw.bind((name, 0))
        raw.settimeout(5)
        out = b"\xff" * 6 + MAC + b"\x88\xb5" + b"to the host" + bytes(40)
        assert tap.send(out)
        assert raw.recv(2048) == out
        back = b"\xff" * 6 + bytes.fromhex("525400abcdef") + b"\x88\xb5" + b"to the guest" + bytes(40)
        raw.send(back)
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and back not in got:
            got += tap.recv(16)
            time.sleep(0.005)
        assert back in got
    finally:
        if raw is not None:
            raw.close()
        tap.close()
    assert tap.fileno() is None and not tap.link_up


def test_stream_empty_frames_cannot_keep_recv_busy(pair) -> None:
    """A peer sending zero-length frames without end: recv() takes at most `limit` frames,
    empty ones included, and returns to the run loop (it spun while data kept coming)."""
    import threading
    backend, peer = pair
    stop = threading.Event()

    def flood() -> None:
        chunk = bytes(4) * 16384
        while not stop.is_set():
            try:
                peer.sendall(chunk)
            except OSError:
                return
    t = threading.Thread(target=flood, daemon=True)
    t.start()
    done = threading.Event()
    result: list = []
    r = threading.Thread(target=lambda: (result.append(backend.recv(64)), done.set()), daemon=True)
    try:
        time.sleep(0.05)
        r.start()
        assert done.wait(5), "recv() kept reading empty frames"
        assert result == [[]] and backend.stats["rx_empty"] <= 64
    finally:
        stop.set()
        peer.shutdown(socket.SHUT_RDWR)
        r.join(10)
        t.join(10)


def test_passt_log_is_made_before_its_directory_is_handed_over(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """As root, passt's directory goes to nobody; its log must already exist then (made new,
    no link followed), or something running as nobody could plant a link there for root to
    truncate (issue 14)."""
    from pyvirt.backends import net
    fake = tmp_path / "passt"
    fake.write_text("#!/bin/sh\necho 'no good' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    seen: list[bool] = []
    monkeypatch.setattr(net.os, "geteuid", lambda: 0)
    monkeypatch.setattr(net.os, "chown", lambda p, *_: seen.append((Path(p) / "passt.log").is_file()))
    with pytest.raises(ConfigError, match="no good"):
        PasstBackend()
    assert seen == [True]


def test_a_dead_passt_is_started_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """passt dies: the link goes down, and after the restart delay recv() starts a new passt
    and the link comes back up (it stayed down for good) (issue 14)."""
    import os
    import signal
    import sys
    fake = tmp_path / "passt"
    fake.write_text(f"#!{sys.executable}\n"
                    "import os, sys\n"
                    "a = sys.argv\n"
                    "fd = int(a[a.index('--fd') + 1])\n"
                    "open(a[a.index('--pid') + 1], 'w').write(str(os.getpid()))\n"
                    "while os.read(fd, 65536):\n"
                    "    pass\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(PasstBackend, "RESTART_DELAYS", (0.0,))
    b = PasstBackend()
    try:
        assert b.link_up and b.proc is not None
        first = b.proc.pid
        os.kill(first, signal.SIGKILL)
        b.proc.wait()
        deadline = time.monotonic() + 10
        while b.link_up and time.monotonic() < deadline:
            b.recv(8)
            time.sleep(0.01)
        assert not b.link_up
        while not b.link_up and time.monotonic() < deadline:
            b.recv(8)
            time.sleep(0.01)
        assert b.link_up and b.proc is not None and b.proc.pid != first and b.proc.poll() is None
        assert b.send(frame(60, 1))
    finally:
        b.close()
    assert b.proc is None


def test_stream_a_short_read_ends_the_poll_without_another_system_call(pair) -> None:
    """What the peer sent fits one read: recv() returns its frames after that one read (a
    second would only find the socket empty, one system call and exception per poll); what
    arrives later, the next recv() reads; a read that fills the buffer is followed by another."""
    backend, peer = pair
    reads: list[int] = []
    real = backend.stream.recv_into

    def counted(buf):
        n = real(buf)
        reads.append(n)
        return n
    backend.stream.recv_into = counted
    peer.sendall(framed(frame(100, 3)) + framed(frame(42, 4)))
    time.sleep(0.05)
    assert backend.recv(64) == [frame(100, 3), frame(42, 4)] and reads == [150]
    peer.sendall(framed(frame(60, 5)))
    time.sleep(0.05)
    assert backend.recv(64) == [frame(60, 5)] and reads == [150, 64]
    backend._chunk = memoryview(bytearray(4096))                # (reads of 4 KiB)
    many = [frame(1500, i) for i in range(60)]                 # 90 KiB: many reads
    peer.sendall(b"".join(framed(f) for f in many))
    time.sleep(0.05)
    reads.clear()
    assert recv_until(backend, 60) == many
    assert len(reads) >= 22 and reads[0] == 4096
