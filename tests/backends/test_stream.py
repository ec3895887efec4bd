"""The buffered non-blocking stream shared by stream NICs and the runner's console."""

from __future__ import annotations

import socket

from pyvirt.stream import BufferedStream


def test_queue_flush_recv_and_the_bound() -> None:
    ours, theirs = socket.socketpair()
    s = BufferedStream(ours, max_out=8)
    assert s.recv(10) == b"" and not s.closed and s.fileno() == ours.fileno()
    s.queue(b"hello")
    assert not s.full() and s.flush() is None and s.out == b""
    assert theirs.recv(10) == b"hello"
    s.queue(b"x" * 8)
    assert s.full()  # the caller's policy decides: refuse or drop
    theirs.sendall(b"back")
    assert s.recv(10) == b"back"
    s.close()
    theirs.close()


def test_the_peer_leaving_closes_the_stream() -> None:
    ours, theirs = socket.socketpair()
    s = BufferedStream(ours, max_out=1 << 20)
    theirs.close()
    assert s.recv(10) is None and s.closed and s.fileno() is None
    assert s.recv(10) is None and s.flush() is None  # closed: nothing more happens


def test_a_send_error_closes_the_stream_and_is_returned() -> None:
    ours, theirs = socket.socketpair()
    s = BufferedStream(ours, max_out=1 << 20)
    theirs.close()
    s.queue(b"data")
    error = s.flush()
    assert isinstance(error, OSError) and s.closed and s.out == b""
