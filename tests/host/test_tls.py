"""host/tls.py without guests: credentials made with openssl here, two relays back to back
over TCP on 127.0.0.1 (the source's and the destination's), their plaintext ends used as a
runner would."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.host.tls import BUFFER, Creds, PlaintextPeer, Relay, TlsError
from pyvirt.testing.tlscerts import make_ca, make_creds


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    ca = make_ca(d / "ca")
    make_creds(d / "good", ca)
    make_creds(d / "foreign", make_ca(d / "ca-b"))
    (d / "foreign" / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())   # trusts A, shows B's
    return d


def pair(client: Creds, server: Creds, hostname: str = "127.0.0.1") -> tuple[Relay, Relay | TlsError]:
    listener = socket.create_server(("127.0.0.1", 0))
    out: list[Relay | TlsError] = []

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            out.append(server.accept(conn))
        except TlsError as e:
            out.append(e)
    t = threading.Thread(target=accept)
    t.start()
    try:
        c = client.connect(socket.create_connection(listener.getsockname()), hostname)
    finally:
        t.join(30)
        listener.close()
    return c, out[0]


@pytest.fixture
def relays(certs: Path) -> Iterator[tuple[Relay, Relay]]:
    creds = Creds(certs / "good")
    c, s = pair(creds, creds)
    assert isinstance(s, Relay)
    yield c, s
    for r in (c, s):
        r.plain.close()


def test_both_ways_at_once_intact_and_eof_ends_both_relays(relays: tuple[Relay, Relay]) -> None:
    """24 MiB up and 8 MiB down at the same time, each read whole at the other end; then the
    source's end closes, the destination's end reads EOF and both relays end cleanly."""
    c, s = relays
    up, down = os.urandom(24 << 20), os.urandom(8 << 20)
    got: list[bytes] = []

    def destination() -> None:
        h = hashlib.sha256()
        n = 0
        while n < len(up):
            data = s.plain.recv(1 << 20)
            assert data
            h.update(data)
            n += len(data)
        got.append(h.digest())
    t = threading.Thread(target=destination)
    t.start()
    writer = threading.Thread(target=s.plain.sendall, args=(down,))
    writer.start()
    back = bytearray()
    c.plain.settimeout(60)
    sender = threading.Thread(target=c.plain.sendall, args=(up,))
    sender.start()
    while len(back) < len(down):
        data = c.plain.recv(1 << 20)
        assert data
        back += data
    for th in (sender, writer, t):
        th.join(60)
    assert got == [hashlib.sha256(up).digest()] and bytes(back) == down
    c.plain.close()                           # the source's end: the relays pass the end on
    s.plain.settimeout(10)
    assert s.plain.recv(10) == b""
    c.join(10)
    s.join(10)
    assert not c._thread.is_alive() and not s._thread.is_alive()
    assert c.error is None and s.error is None


def test_a_reader_that_stops_stops_the_writer(relays: tuple[Relay, Relay]) -> None:
    """Bounded: with nobody reading the destination's end, the source's writes block after the
    relays' buffers and the kernel's socket buffers are full."""
    c, _ = relays
    c.plain.setblocking(False)
    sent = 0
    chunk = bytes(1 << 16)
    for _ in range(4096):                     # up to 256 MiB
        try:
            sent += c.plain.send(chunk)
        except BlockingIOError:
            threading.Event().wait(0.2)       # the relays move what they can, then stop
            try:
                sent += c.plain.send(chunk)
            except BlockingIOError:
                break
    assert sent < 2 * BUFFER + (32 << 20), sent


def test_a_foreign_client_certificate_is_refused(certs: Path) -> None:
    c, s = pair(Creds(certs / "foreign"), Creds(certs / "good"))
    assert isinstance(s, TlsError) and "certificate verify failed: unable to get local issuer" in str(s)
    c.plain.settimeout(10)
    try:                                      # TLS 1.3: the client learns it on its first read
        c.plain.sendall(b"hello")
        assert c.plain.recv(10) == b""
    except (BrokenPipeError, ConnectionResetError):
        pass                                  # (the relay already ended on the alert)
    c.join(10)
    assert c.error is not None and "unknown ca" in c.error


def test_the_name_is_checked(certs: Path) -> None:
    creds = Creds(certs / "good")
    with pytest.raises(TlsError, match="Hostname mismatch"):
        pair(creds, creds, hostname="other.example")


def test_a_plaintext_peer_is_told_apart(certs: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    peer.sendall(b"\x01\x00\x00\x00\x10{")
    conn, _ = listener.accept()
    listener.close()
    with pytest.raises(PlaintextPeer):
        Creds(certs / "good").accept(conn)
    assert conn.recv(6) == b"\x01\x00\x00\x00\x10{"       # left open, unread
    conn.close()
    peer.close()


def test_incomplete_credentials(certs: Path, tmp_path: Path) -> None:
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem"):
        (tmp_path / f).write_bytes((certs / "good" / f).read_bytes())
    with pytest.raises(TlsError, match="no client-key.pem there"):
        Creds(tmp_path)
    (tmp_path / "client-key.pem").write_bytes((certs / "foreign" / "client-key.pem").read_bytes())
    with pytest.raises(TlsError, match="key values mismatch"):
        Creds(tmp_path)
