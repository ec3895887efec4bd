"""Fake backends for device tests: in memory, observable, and able to fail on demand."""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

from pyvirt.backends.block import SECTOR, Buffer
from pyvirt.backends.char import BufferBackend


class MemoryBlockBackend:
    """A `BlockBackend` over a bytearray.

    Set `fail_reads`, `fail_writes` or `fail_flush` to make the next calls
    raise OSError(EIO), as a failing disk would.  Counters record what the
    device asked for.
    """

    def __init__(self, size: int = 1 << 20, data: bytes | None = None, read_only: bool = False) -> None:
        if data is not None:
            size = len(data)
        if size < 0 or size % SECTOR:
            raise ValueError(f"disk size {size} is not a multiple of {SECTOR}")
        self.data = bytearray(data if data is not None else size)
        self.size = size
        self.read_only = read_only
        self.fail_reads = self.fail_writes = self.fail_flush = False
        self.reads = self.writes = self.flushes = 0
        self.discards: list[tuple[int, int]] = []
        self.unflushed = False            # written since the last flush
        self.closed = False

    def _check(self, offset: int, length: int) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "backend closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"range {offset:#x}+{length:#x} beyond the disk")

    def readinto(self, offset: int, buf: memoryview) -> int:
        return self.readv(offset, [buf])

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        total = sum(len(b) for b in bufs)
        self._check(offset, total)
        if self.fail_reads:
            raise OSError(errno.EIO, "injected read error")
        pos = offset
        for b in bufs:
            b[:] = self.data[pos:pos + len(b)]
            pos += len(b)
        self.reads += 1
        return total

    def write(self, offset: int, data: Buffer) -> int:
        return self.writev(offset, [data])

    def writev(self, offset: int, bufs: Sequence[Buffer]) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        total = sum(memoryview(b).nbytes for b in bufs)
        self._check(offset, total)
        if self.fail_writes:
            raise OSError(errno.EIO, "injected write error")
        pos = offset
        for b in bufs:
            mv = memoryview(b).cast("B")
            self.data[pos:pos + len(mv)] = mv
            pos += len(mv)
        self.writes += 1
        self.unflushed = True
        return total

    def flush(self) -> None:
        if self.fail_flush:
            raise OSError(errno.EIO, "injected flush error")
        self.flushes += 1
        self.unflushed = False

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        self._check(offset, length)
        self.discards.append((offset, length))
        self.data[offset:offset + length] = bytes(length)

    def close(self) -> None:
        self.closed = True

    def save(self) -> dict[str, Any]:
        return {"size": self.size}

    def load(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size:
            raise ValueError("snapshot is for a disk of another size")


class FakeCharBackend(BufferBackend):
    """A `BufferBackend` that also records each call, has an optional file
    descriptor, and can inject input when polled (`on_poll`)."""

    def __init__(self, fd: int | None = None) -> None:
        super().__init__()
        self.fd = fd
        self.writes: list[bytes] = []
        self.polls = 0
        self.flushes = 0
        self.pending_input = bytearray()
        self.on_poll: Callable[[FakeCharBackend], None] | None = None

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        super().write(data)

    def type_later(self, data: bytes) -> None:
        """Input delivered at the next `poll()`, as a real event loop would."""
        self.pending_input += data

    def fileno(self) -> int | None:
        return self.fd

    def poll(self) -> None:
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll(self)
        if self.pending_input:
            data = bytes(self.pending_input)
            self.pending_input.clear()
            self.feed(data)

    def flush(self) -> None:
        self.flushes += 1
