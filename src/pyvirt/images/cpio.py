"""The "newc" cpio format: the archive format of the Linux initramfs.

Each entry (Documentation/driver-api/early-userspace/buffer-format.rst) is a
110-byte header, the 6-byte magic 070701 followed by thirteen 8-digit hex
fields (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
rdevmajor, rdevminor, namesize, check), then the NUL-terminated name padded
to a multiple of 4 bytes (header included), then the data padded to a
multiple of 4.  A symlink's data is its target.  The archive ends with an
entry named TRAILER!!!.

`CpioWriter` builds an archive in memory (uncompressed: the kernel needs no
decompressor for it); `read_newc` parses one back (for tests and checks).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER = 110
_MAX = 0xFFFFFFFF


@dataclass
class Entry:
    name: str
    mode: int                   # file type and permission bits (stat.S_IF* | 0o755)
    data: bytes = b""           # file content, or a symlink's target
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0
    mtime: int = 0


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _clean(name: str) -> str:
    parts = name.strip("/").split("/")
    if not name.strip("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        raise ValueError(f"bad cpio entry name {name!r}")
    return "/".join(parts)


class CpioWriter:
    """An in-memory newc archive; parents of an entry are added as directories when missing."""

    def __init__(self, mtime: int = 0) -> None:
        self.entries: list[Entry] = []
        self.mtime = mtime              # one timestamp for every entry: reproducible archives
        self._names: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        name = _clean(entry.name)
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name!r}")
        if len(entry.data) > _MAX:
            raise ValueError(f"cpio entry {name!r} is too large for the newc format")
        parent = name.rpartition("/")[0]
        if parent:
            p = self._names.get(parent)
            if p is None:
                self.directory(parent)
            elif not stat.S_ISDIR(p.mode):
                raise ValueError(f"cpio entry {name!r}: {parent!r} is not a directory")
        entry.name = name
        entry.mtime = entry.mtime or self.mtime
        self._names[name] = entry
        self.entries.append(entry)

    def directory(self, name: str, mode: int = 0o755) -> None:
        self.add(Entry(name, stat.S_IFDIR | mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.add(Entry(name, stat.S_IFREG | mode, bytes(data)))

    def symlink(self, name: str, target: str) -> None:
        self.add(Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.add(Entry(name, stat.S_IFCHR | mode, rdev=(major, minor)))

    def __contains__(self, name: str) -> bool:
        return name.strip("/") in self._names

    def __len__(self) -> int:
        return len(self.entries)

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, e in enumerate(self.entries, start=1):
            out += _entry(e, ino, 2 if stat.S_ISDIR(e.mode) else 1)
        out += _entry(Entry(TRAILER, 0), 0, 1)
        return bytes(out)


def _entry(e: Entry, ino: int, nlink: int) -> bytes:
    name = e.name.encode() + b"\0"
    fields = (ino, e.mode, e.uid, e.gid, nlink, e.mtime, len(e.data), 0, 0, e.rdev[0], e.rdev[1],
              len(name), 0)
    head = MAGIC + b"".join(b"%08X" % v for v in fields) + name
    return head + _pad(len(head)) + e.data + _pad(len(e.data))


def read_newc(data: bytes) -> list[Entry]:
    """Parse a newc archive (up to its trailer); raise ValueError if it is malformed."""
    out: list[Entry] = []
    pos = 0
    while True:
        if pos + _HEADER > len(data):
            raise ValueError(f"truncated cpio header at offset {pos}")
        if data[pos:pos + 6] not in (b"070701", b"070702"):
            raise ValueError(f"bad cpio magic at offset {pos}")
        try:
            f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ValueError(f"bad cpio header field at offset {pos}") from None
        mode, uid, gid, mtime, size, namesize = f[1], f[2], f[3], f[5], f[6], f[11]
        end_name = pos + _HEADER + namesize
        if namesize < 1 or end_name > len(data) or data[end_name - 1] != 0:
            raise ValueError(f"bad cpio name at offset {pos}")
        name = data[pos + _HEADER:end_name - 1].decode("utf-8", "surrogateescape")
        start = end_name + (-end_name % 4)
        if start + size > len(data):
            raise ValueError(f"truncated cpio data of {name!r}")
        if name == TRAILER:
            return out
        out.append(Entry(name, mode, data[start:start + size], (f[9], f[10]), uid, gid, mtime))
        pos = start + size + (-size % 4)
