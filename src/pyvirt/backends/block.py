"""Block backends: where a virtual disk's bytes live.

A `BlockBackend` knows nothing about virtio: it reads into and writes from
bytes-like buffers at byte offsets.  The vectored calls (`readv`/`writev`)
take lists of memoryviews so a device can hand it views of guest RAM and the
data moves with one preadv/pwritev system call, no copies.

`RawFileBackend` serves a raw image file (or block device):

* reads and writes with os.preadv / os.pwritev, looping over short transfers;
* `flush()` is fdatasync, so a completed FLUSH request means the data is on
  stable storage;
* an fcntl lock on the image -- exclusive when writable, shared when read-only
  -- so two VMs cannot open one image for writing (nor one writer and any
  reader); a conflict is a one-line `ImageError`;
* a size that is not a multiple of 512 bytes is rounded down: a partial last
  sector is not addressable.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, Union

from pyvirt.errors import ImageError

SECTOR = 512

# fallocate(2) mode bits (linux/falloc.h)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

Buffer = Union[bytes, bytearray, memoryview]   # evaluated at run time: 3.9 lacks X | Y


class BlockBackend(Protocol):
    """What a block device model needs from its storage."""

    size: int              # bytes, a multiple of SECTOR
    read_only: bool

    def readinto(self, offset: int, buf: memoryview) -> int: ...

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int: ...

    def write(self, offset: int, data: Buffer) -> int: ...

    def writev(self, offset: int, bufs: Sequence[Buffer]) -> int: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...

    def save(self) -> dict[str, Any]: ...

    def load(self, state: dict[str, Any]) -> None: ...


def _preadv(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
    """os.preadv, or one pread at a time where the interpreter lacks it (PyPy 3.9)."""
    if _HAVE_VECTORED:
        return os.preadv(fd, bufs, offset)
    done = 0
    for b in bufs:
        data = os.pread(fd, len(b), offset + done)
        memoryview(b).cast("B")[:len(data)] = data
        done += len(data)
        if len(data) < len(b):
            break
    return done


def _pwritev(fd: int, bufs: Sequence[Buffer], offset: int) -> int:
    """os.pwritev, or one pwrite at a time where the interpreter lacks it."""
    if _HAVE_VECTORED:
        return os.pwritev(fd, bufs, offset)
    done = 0
    for b in bufs:
        mv = memoryview(b).cast("B")
        n = os.pwrite(fd, mv, offset + done)
        done += n
        if n < len(mv):
            break
    return done


_HAVE_VECTORED = hasattr(os, "preadv") and hasattr(os, "pwritev")


def advance(bufs: Sequence[Buffer], n: int) -> list[memoryview]:
    """The buffers with their first `n` bytes dropped (no data copied)."""
    out: list[memoryview] = []
    for b in bufs:
        mv = memoryview(b)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if n >= len(mv):
            n -= len(mv)
            continue
        out.append(mv[n:])
        n = 0
    return out


def _fill_zero(bufs: Sequence[memoryview], start: int) -> None:
    """Zero every byte of `bufs` from byte `start` on (a read past end of file)."""
    for b in advance(bufs, start):
        b[:] = bytes(len(b))


def open_locked(path: Path, read_only: bool) -> int:
    """Open a disk image file and lock it: exclusive when writable, shared when read-only.

    Any failure (missing, a directory, not a file or block device, no
    permission, locked by another VM) is a one-line `ImageError`.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"disk image {path} does not exist") from None
    except OSError as e:
        raise ImageError(f"cannot open disk image {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"disk image {path} is a directory")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError(f"disk image {path} is not a regular file or block device")
    if not read_only and stat.S_ISREG(st.st_mode) and not st.st_mode & 0o222:
        # What a snapshot froze (or a user made read-only) stays so, even for root, whom the
        # kernel would let write: a snapshot's overlays depend on the image not changing.
        raise ImageError(f"disk image {path} is read-only (no write permission bits; a snapshot's "
                         "frozen image?): add ,ro to read it")
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except PermissionError:
        mode = "reading" if read_only else "reading and writing"
        raise ImageError(f"no permission to open disk image {path} for {mode}"
                         + ("" if read_only else " (add ,ro for a read-only disk)")) from None
    except OSError as e:
        raise ImageError(f"cannot open disk image {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ImageError(f"disk image {path} is in use by another VM") from None
        raise ImageError(f"cannot lock disk image {path}: {e.strerror}") from None
    return fd


class RawFileBackend:
    """A raw disk image file, locked for the lifetime of the backend."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.fd = fd = open_locked(self.path, read_only)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            # An unreadable file (EIO, a directory-like special) fails here, not in the guest.
            os.pread(fd, min(SECTOR, size), 0)
        except OSError as e:
            self.close()
            raise ImageError(f"cannot read disk image {self.path}: {e.strerror}") from None
        self.size = size - size % SECTOR

    def _check(self, offset: int, length: int) -> None:
        if self.fd < 0:
            raise OSError(errno.EBADF, "disk image is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"range {offset:#x}+{length:#x} beyond the disk")

    # -- reads -----------------------------------------------------------------------
    def readinto(self, offset: int, buf: memoryview) -> int:
        return self.readv(offset, [buf])

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
        """Fill `bufs` from `offset` on; bytes past the end of the file read as zeros."""
        total = sum(len(b) for b in bufs)
        self._check(offset, total)
        done = 0
        while done < total:
            n = _preadv(self.fd, advance(bufs, done) if done else bufs, offset + done)
            if n == 0:                       # the file shrank under us: zeros, like a hole
                _fill_zero(bufs, done)
                break
            done += n
        return total

    # -- writes ----------------------------------------------------------------------
    def write(self, offset: int, data: Buffer) -> int:
        return self.writev(offset, [data])

    def writev(self, offset: int, bufs: Sequence[Buffer]) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        total = sum(memoryview(b).nbytes for b in bufs)
        self._check(offset, total)
        done = 0
        while done < total:
            n = _pwritev(self.fd, advance(bufs, done) if done else bufs, offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write to disk image")
            done += n
        return total

    def flush(self) -> None:
        """Make completed writes durable (fdatasync)."""
        if self.fd >= 0 and not self.read_only:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Let the host free the range (punch a hole); the range then reads as zeros.

        Discard is advisory: where the file system cannot punch holes this does
        nothing.
        """
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        self._check(offset, length)
        if length == 0:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def close(self) -> None:
        """Release the lock and the file; idempotent."""
        if self.fd >= 0:
            os.close(self.fd)        # closing the descriptor drops the flock
            self.fd = -1

    # -- state ---------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        """No volatile state (writes go straight to the file); what it serves, for checking."""
        return {"path": str(self.path), "size": self.size, "read_only": self.read_only}

    def load(self, state: dict[str, Any]) -> None:
        if state.get("size", self.size) != self.size:
            raise ImageError(f"disk image {self.path} is {self.size} bytes, "
                             f"the snapshot expects {state['size']}")
