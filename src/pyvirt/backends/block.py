"""Block backends: raw image files.

`RawFileBackend` serves reads and writes with preadv/pwritev straight from
and into guest memory views, flushes with fdatasync, and holds an fcntl lock
on the image (exclusive when writable, shared when read-only) so two VMs
cannot write one image.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Protocol

from pyvirt.errors import ImageError

SECTOR = 512


class BlockBackend(Protocol):
    size: int
    read_only: bool

    def readinto(self, offset: int, bufs: list[memoryview]) -> int: ...

    def write(self, offset: int, bufs: list[memoryview]) -> int: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


class RawFileBackend:
    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise ImageError(f"disk image {self.path} does not exist") from None
        except OSError as e:
            raise ImageError(f"cannot open disk image {self.path}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"disk image {self.path} is a directory")
        try:
            self.fd = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as e:
            raise ImageError(f"cannot open disk image {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ImageError(f"disk image {self.path} is in use by another VM") from None
            raise ImageError(f"cannot lock disk image {self.path}: {e.strerror}") from None
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        if stat.S_ISBLK(st.st_mode) is False and self.size % SECTOR:
            self.size -= self.size % SECTOR     # a partial last sector is not addressable

    def readinto(self, offset: int, bufs: list[memoryview]) -> int:
        total = sum(len(b) for b in bufs)
        done = os.preadv(self.fd, bufs, offset)
        if done < total:           # past the end of a sparse/short file: zeros
            remaining = done
            for b in bufs:
                if remaining >= len(b):
                    remaining -= len(b)
                    continue
                b[remaining:] = bytes(len(b) - remaining)
                remaining = 0
        return total

    def write(self, offset: int, bufs: list[memoryview]) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        total = sum(len(b) for b in bufs)
        done = 0
        while done < total:
            n = os.pwritev(self.fd, bufs, offset + done) if done == 0 else \
                os.pwrite(self.fd, b"".join(bytes(b) for b in bufs)[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n
        return total

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        punch = getattr(fcntl, "FALLOC_FL_PUNCH_HOLE", 0x02) | getattr(fcntl, "FALLOC_FL_KEEP_SIZE", 0x01)
        try:
            os.posix_fallocate  # noqa: B018 - availability check only
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate(self.fd, punch, ctypes.c_long(offset), ctypes.c_long(length))
        except (OSError, AttributeError):
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
