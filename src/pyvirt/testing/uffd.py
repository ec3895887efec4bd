"""A second, independent dirty-page tracker for tests: the kernel's userfaultfd
write-protection in asynchronous mode, read with the PAGEMAP_SCAN ioctl (Linux 6.7+).

`WriteTracker(buffer)` registers the pages of a writable Python buffer (guest RAM's
mmap) with userfaultfd in write-protect mode with UFFD_FEATURE_WP_ASYNC: the kernel
resolves a write fault itself (no handler thread) by lifting the protection, and
PAGEMAP_SCAN reports the pages that lost it ("written") and protects them again in
the same call.  It sees every write to the pages from this process, whoever makes it:
Python code, a C extension, or the kernel itself copying a read() into the buffer.
`harvest()` returns the written page indexes since the last one, like the bus's
dirty-page log, so a test can compare the two (tests/vmm/test_dirty_diff.py).

The constants and structures are those of <linux/userfaultfd.h> and <linux/fs.h>
(x86-64 and arm64 share them); `unavailable()` says in one line why the host cannot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
from typing import Any

PAGE = 4096
SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
UFFD_API = 0xAA
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


UFFDIO_API = _iowr(0xAA, 0x3F, ctypes.sizeof(_Api))
UFFDIO_REGISTER = _iowr(0xAA, 0x00, ctypes.sizeof(_Register))
UFFDIO_UNREGISTER = (1 << 30) | (16 << 16) | (0xAA << 8) | 0x01      # _IOR, struct uffdio_range
UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, ctypes.sizeof(_WriteProtect))
PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(_ScanArg))

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def _ioctl(fd: int, request: int, arg: Any) -> int:
    r = _libc.ioctl(fd, request, ctypes.byref(arg))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"ioctl {request:#x}: {os.strerror(e)}")
    return int(r)


def _userfaultfd() -> int:
    nr = SYS_USERFAULTFD.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"userfaultfd: no system call number for {platform.machine()}")
    fd = _libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"userfaultfd: {os.strerror(e)}")
    return int(fd)


def unavailable() -> str | None:
    """Why this host cannot track writes this way (one line), or None."""
    try:
        probe = bytearray(PAGE * 2)
        WriteTracker(probe).close()
    except OSError as e:
        return f"userfaultfd write-protect with PAGEMAP_SCAN is not available: {e}"
    return None


class WriteTracker:
    """Written pages of `buffer` (a writable buffer: guest RAM's mmap), page-aligned part only."""

    def __init__(self, buffer: Any) -> None:
        self._anchor: Any = ctypes.c_char.from_buffer(buffer)  # keeps the buffer from moving
        addr = ctypes.addressof(self._anchor)
        self.base = (addr + PAGE - 1) & ~(PAGE - 1)
        self.offset = self.base - addr                           # buffer offset of page 0
        self.length = ((addr + len(buffer)) & ~(PAGE - 1)) - self.base
        self.fd = _userfaultfd()
        self.pagemap = -1
        try:
            api = _Api(UFFD_API, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, 0)
            _ioctl(self.fd, UFFDIO_API, api)
            _ioctl(self.fd, UFFDIO_REGISTER, _Register(self.base, self.length, UFFDIO_REGISTER_MODE_WP, 0))
            self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            _ioctl(self.fd, UFFDIO_WRITEPROTECT, _WriteProtect(self.base, self.length, UFFDIO_WRITEPROTECT_MODE_WP))
        except OSError:
            self.close()
            raise
        self._vec = (_Region * 512)()

    def harvest(self) -> set[int]:
        """Indexes of the pages written since the tracker started or last harvested (page 0
        begins at buffer offset `offset`); they are write-protected again."""
        pages: set[int] = set()
        start, end = self.base, self.base + self.length
        while start < end:
            arg = _ScanArg(ctypes.sizeof(_ScanArg), PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                           start, end, 0, ctypes.addressof(self._vec), len(self._vec), 0,
                           0, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN)
            n = _ioctl(self.pagemap, PAGEMAP_SCAN, arg)
            for region in self._vec[:n]:
                pages.update(range((region.start - self.base) // PAGE, (region.end - self.base) // PAGE))
            if arg.walk_end <= start:
                raise OSError(errno.EIO, "PAGEMAP_SCAN made no progress")
            start = arg.walk_end
        return pages

    def close(self) -> None:
        if self.pagemap >= 0:
            os.close(self.pagemap)
            self.pagemap = -1
        if self.fd >= 0:
            try:
                fcntl.ioctl(self.fd, UFFDIO_UNREGISTER, bytes(_WriteProtect(self.base, self.length, 0))[:16])
            except OSError:
                pass
            os.close(self.fd)            # closing the descriptor ends the registration anyway
            self.fd = -1
        self._anchor = None
