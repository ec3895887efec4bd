"""The host side of virtio-vsock: Firecracker's hybrid vsock over Unix sockets.

The VMM listens on one Unix socket (PATH).  A host program connects to it and
writes ``CONNECT <port>\\n``; once the guest accepts, it reads ``OK <hostport>\\n``
and the stream is the connection to the guest's vsock port.  A guest that
connects to host port P (CID 2) reaches the Unix socket ``PATH_P``, if one
listens there.

This module knows nothing about virtio: it hands the device connected, non-blocking
stream sockets (`HostStream`) and the port each one asks for.  What a peer sends before
its CONNECT line is bounded (`MAX_LINE` bytes, `HANDSHAKE_TIMEOUT` seconds,
`MAX_HANDSHAKES` at once); anything else is dropped with its socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pyvirt.errors import ConfigError
from pyvirt.fsutil import listen_unix

log = logging.getLogger(__name__)

MAX_LINE = 32                  # "CONNECT 4294967295\n" is 19 bytes
HANDSHAKE_TIMEOUT = 5.0        # seconds a host client has to send its CONNECT line
MAX_HANDSHAKES = 16            # host clients not yet past their CONNECT line
BACKLOG = 128                  # connections the kernel queues until the VMM accepts them


class HostStream:
    """One non-blocking host stream socket behind a vsock connection."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self.sock.fileno()

    def recv(self, limit: int) -> bytes | None:
        """Up to `limit` bytes; None if nothing is there now; b"" at end of stream or on error."""
        try:
            return self.sock.recv(limit)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Bytes taken (0 if the socket is full); -1 if the peer is gone."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return -1

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


def parse_connect(line: bytes) -> int | None:
    """b'CONNECT 1234' -> 1234 (a 32-bit port); None if it is anything else."""
    parts = line.strip(b"\r").split(b" ")
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit() or len(parts[1]) > 10:
        return None
    port = int(parts[1])
    return port if port <= 0xFFFF_FFFF else None


class UnixVsockBackend:
    """The listening socket at PATH, its half-open host clients, and connections to PATH_P."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.clock = clock
        try:
            self.server = listen_unix(self.path, BACKLOG)
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.path}: {e.strerror}") from None
        self.handshakes: list[tuple[socket.socket, float]] = []

    def fileno(self) -> int:
        return self.server.fileno()

    def wait_fds(self) -> list[int]:
        return [self.server.fileno(), *(s.fileno() for s, _ in self.handshakes)]

    def accept(self) -> list[tuple[HostStream, int]]:
        """Host clients that have sent their CONNECT line, with the guest port each wants."""
        while len(self.handshakes) < MAX_HANDSHAKES:
            try:
                s, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:                 # EMFILE and the like: try again later
                log.debug("vsock: accept failed: %s", e)
                break
            s.setblocking(False)
            self.handshakes.append((s, self.clock()))
        ready: list[tuple[HostStream, int]] = []
        keep: list[tuple[socket.socket, float]] = []
        now = self.clock()
        for s, since in self.handshakes:
            port, done = self._read_line(s)
            if port is not None:
                ready.append((HostStream(s), port))
            elif done or now - since > HANDSHAKE_TIMEOUT:
                s.close()
            else:
                keep.append((s, since))
        self.handshakes = keep
        return ready

    @staticmethod
    def _read_line(s: socket.socket) -> tuple[int | None, bool]:
        """(port, finished): the port once a whole valid line is in; finished = give up."""
        try:
            head = s.recv(MAX_LINE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None, False
        except OSError:
            return None, True
        if not head:
            return None, True
        end = head.find(b"\n")
        if end < 0:
            return None, len(head) >= MAX_LINE
        try:
            s.recv(end + 1)                          # consume exactly the line; data stays queued
        except OSError:
            return None, True
        port = parse_connect(head[:end])
        if port is None:
            return None, True
        return port, True

    def connect(self, port: int) -> HostStream | None:
        """The guest connects to host port `port`: a connection to PATH_port, or None."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            s.connect(f"{self.path}_{port}")
        except OSError as e:
            s.close()
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                log.debug("vsock: connecting to %s_%d: %s", self.path, port, e)
            return None
        return HostStream(s)

    def close(self) -> None:
        for s, _ in self.handshakes:
            s.close()
        self.handshakes = []
        self.server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()                       # (already gone: nothing to do)


def connect_guest(path: str | Path, port: int, timeout: float = 5.0) -> tuple[socket.socket, int]:
    """A host client's side: connect to the VMM's socket at `path`, ask for guest port
    `port`, and return the connected socket and the host port the VMM gave it.
    OSError if the VMM refuses or the guest has nobody listening."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                s.connect(str(path))
                break
            except BlockingIOError:              # the VMM's backlog is full: it accepts between slices
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        s.sendall(b"CONNECT %d\n" % port)
        line = b""
        while not line.endswith(b"\n"):
            b = s.recv(1)
            if not b or len(line) > MAX_LINE:
                raise ConnectionRefusedError(
                    errno.ECONNREFUSED, f"nothing listens on the guest's vsock port {port}")
            line += b
        parts = line.split()
        if len(parts) != 2 or parts[0] != b"OK" or not parts[1].isdigit():
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"unexpected reply {line[:40]!r}")
        s.settimeout(None)
        return s, int(parts[1])
    except BaseException:
        s.close()
        raise
