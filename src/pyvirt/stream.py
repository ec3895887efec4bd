"""A connected, non-blocking stream socket with a bounded queue of output for the peer.

The buffered socket I/O that the stream NIC backend (`backends/net.py`), the runner's
console (`host/runner.py`) and virtio-console's socket ports (`UnixSocketPort`) share.  Writes the
socket does not take now wait in `out`, at most about `max_out` bytes: what the caller does
when it is full (refuse, drop) is its own policy.  A socket error or the peer's end of stream
closes the stream; the caller learns it from the return value and `closed`."""

from __future__ import annotations

import socket
from typing import Union

Buffer = Union[bytes, bytearray, memoryview]  # evaluated at run time: 3.9 lacks X | Y


class BufferedStream:
    def __init__(self, sock: socket.socket, max_out: int) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self.out = bytearray()
        self.max_out = max_out

    @property
    def closed(self) -> bool:
        return self.sock is None

    def fileno(self) -> int | None:
        return self.sock.fileno() if self.sock is not None else None

    def full(self) -> bool:
        """Whether `max_out` bytes or more wait for the peer."""
        return len(self.out) >= self.max_out

    def queue(self, data: Buffer) -> None:
        """Add to the output (the caller checks `full()` first); `flush()` sends it."""
        self.out += data

    def flush(self) -> OSError | None:
        """Write what the socket takes now of the queued output.  A socket error closes the
        stream and is returned."""
        while self.out and self.sock is not None:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                self.close()
                return e
            del self.out[:n]
        return None

    def recv(self, limit: int) -> bytes | OSError | None:
        """Up to `limit` bytes the peer sent: b"" when none wait now; None when the peer ended
        the stream, or the OSError that broke it (the stream is closed then)."""
        if self.sock is None:
            return None
        try:
            data = self.sock.recv(limit)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as e:
            self.close()
            return e
        if not data:
            self.close()
            return None
        return data

    def recv_into(self, buf: memoryview) -> int | OSError | None:
        """`recv` into `buf` (no new buffer per call): the bytes read, 0 when none wait now,
        None when the peer ended the stream, or the OSError that broke it."""
        if self.sock is None:
            return None
        try:
            n = self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            self.close()
            return e
        if not n:
            self.close()
            return None
        return n

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.out.clear()
