"""A writer for "newc" cpio archives (the format the Linux initramfs unpacker reads).

Each entry: the 6-byte magic 070701, thirteen 8-digit hex fields (inode,
mode, uid, gid, nlink, mtime, size, dev major/minor, rdev major/minor, name
size, checksum), the NUL-terminated name padded to 4 bytes, then the data
padded to 4 bytes; the archive ends with an entry named TRAILER!!!.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass


@dataclass
class Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._names: set[str] = set()

    def _add(self, entry: Entry) -> None:
        name = entry.name.strip("/")
        if not name or name in self._names:
            raise ValueError(f"bad or duplicate cpio entry {entry.name!r}")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._names:
            self.directory(parent)
        entry.name = name
        self._names.add(name)
        self.entries.append(entry)

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._add(Entry(name, stat.S_IFDIR | mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(Entry(name, stat.S_IFREG | mode, data))

    def symlink(self, name: str, target: str) -> None:
        self._add(Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(Entry(name, stat.S_IFCHR | mode, rdev=(major, minor)))

    def __contains__(self, name: str) -> bool:
        return name.strip("/") in self._names

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, e in enumerate([*self.entries, Entry("TRAILER!!!", 0)], start=1):
            name = e.name.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(e.mode) else 1
            fields = (ino if e.mode else 0, e.mode, 0, 0, nlink if e.mode else 1, 0, len(e.data),
                      0, 0, e.rdev[0], e.rdev[1], len(name), 0)
            out += b"070701" + "".join(f"{v:08X}" for v in fields).encode()
            out += name + _pad(110 + len(name))
            out += e.data + _pad(len(e.data))
        return bytes(out)


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive back into {name: (mode, data)} (used by tests and checks)."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while pos + 110 <= len(data):
        if data[pos:pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            break
        out[name] = (mode, body)
    return out
