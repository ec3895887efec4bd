"""A strict, bounded reader of image layer tars (POSIX ustar, PAX and GNU long names).

`tarfile` reads a PAX header or a GNU long name of any size into memory and parses PAX
records in quadratic time; a layer is a file nobody here made, so this reader bounds what one
header can make it hold (MAX_EXTENDED bytes) and how many headers it reads (MAX_HEADERS), checks
every checksum and number, and hands member data out in chunks, never whole.

Member types kept: regular files ("0", "\\0", "7"), hard links ("1"), symlinks ("2"), character
and block devices ("3", "4"), directories ("5") and FIFOs ("6").  PAX keys used: path, linkpath,
size, uid, gid, mtime and SCHILY.xattr.NAME (xattrs); GNU "L"/"K" long names are read too.
Anything else malformed is a TarFormatError (one line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, BinaryIO

CHUNK = 1 << 20
TYPES = {b"0": "file", b"\0": "file", b"7": "file", b"1": "hardlink", b"2": "symlink", b"3": "char",
         b"4": "block", b"5": "dir", b"6": "fifo"}


class TarFormatError(Exception):
    """The stream is not a tar archive this reader accepts."""


@dataclass
class Member:
    name: str
    kind: str                       # one of TYPES' values
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


class TarReader:
    """Members of the tar stream `src` (a file object with read()), one at a time."""

    MAX_EXTENDED = 1 << 20          # one PAX header or GNU long name
    MAX_HEADERS = 4_000_000

    def __init__(self, src: BinaryIO | Any) -> None:
        self.src = src
        self.left = 0               # unread bytes of the current member's data
        self.pad = 0
        self.headers = 0
        self.done = False

    def _read(self, n: int) -> bytes:
        return read_up_to(self.src, n)

    def _exact(self, n: int, what: str) -> bytes:
        data = self._read(n)
        if len(data) < n:
            raise TarFormatError(f"the layer ends inside {what}")
        return data

    def _skip(self) -> None:
        todo = self.left + self.pad
        while todo:
            n = len(self._read(min(todo, CHUNK)))
            if not n:
                raise TarFormatError("the layer ends inside a member")
            todo -= n
        self.left = self.pad = 0

    def _extended(self, size: int, what: str) -> bytes:
        if size > self.MAX_EXTENDED:
            raise TarFormatError(f"a {what} is larger than {self.MAX_EXTENDED} bytes")
        data = self._exact(size, f"a {what}")
        self._exact(-size % 512, f"a {what}")
        return data

    def next(self) -> Member | None:
        """The next member (its data is read with read()), or None at the end."""
        self._skip()
        pax: dict[str, bytes] = {}
        longname: str | None = None
        longlink: str | None = None
        while not self.done:
            self.headers += 1
            if self.headers > self.MAX_HEADERS:
                raise TarFormatError(f"more than {self.MAX_HEADERS} tar headers")
            block = self._read(512)
            if not header_block(block, TarFormatError("the layer ends inside a tar header")):
                self.done = True
                return None
            size = tar_number(block[124:136])
            kind = block[156:157]
            if kind in (b"x", b"g"):
                records = pax_records(self._extended(size, "PAX header"))
                if kind == b"x":
                    pax.update(records)
                continue
            if kind in (b"L", b"K"):
                text = _text(self._extended(size, "GNU long name").split(b"\0", 1)[0])
                if kind == b"L":
                    longname = text
                else:
                    longlink = text
                continue
            if kind not in TYPES:
                raise TarFormatError(f"a tar member of type {kind!r} is not supported")
            name = block[:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            m = Member(name=_text(pax["path"]) if "path" in pax else longname or _text(name), kind=TYPES[kind])
            m.linkname = (_text(pax["linkpath"]) if "linkpath" in pax else
                          longlink or _text(block[157:257].split(b"\0", 1)[0]))
            m.mode = tar_number(block[100:108]) & 0o7777
            m.uid = _pax_int(pax, "uid", tar_number(block[108:116]))
            m.gid = _pax_int(pax, "gid", tar_number(block[116:124]))
            m.mtime = _pax_int(pax, "mtime", tar_number(block[136:148]))
            size = _pax_int(pax, "size", size)
            m.devmajor, m.devminor = tar_number(block[329:337]), tar_number(block[337:345])
            m.xattrs = {k[len("SCHILY.xattr."):]: v for k, v in pax.items() if k.startswith("SCHILY.xattr.")}
            _check(m)
            if m.kind == "file":
                m.size = size
                self.left, self.pad = size, -size % 512
            return m
        return None

    def read(self, n: int = CHUNK) -> bytes:
        """Up to `n` bytes of the current member's data (b"" at its end)."""
        n = min(n, self.left)
        if n <= 0:
            return b""
        data = self._read(n)
        if len(data) < n:
            raise TarFormatError("the layer is truncated inside a file")
        self.left -= n
        return data


MAX_ID = 0xFFFF_FFFE                 # uid, gid (0xFFFFFFFF is chown's "leave it")
MAX_MTIME = 1 << 34                  # seconds (the year 2514): os.utime takes nanoseconds in 64 bits
MAX_DEV = 0xFFFF_FFFF


def _check(m: Member) -> None:
    """What no file system can hold refused here, for every reader alike: a NUL in a name, a
    link target or an xattr name (only PAX records can carry one), numbers out of range."""
    if "\0" in m.name or "\0" in m.linkname or any("\0" in k or not k for k in m.xattrs):
        raise TarFormatError("a tar member's name, link target or xattr name holds a NUL byte")
    if m.uid > MAX_ID or m.gid > MAX_ID or m.mtime > MAX_MTIME or m.devmajor > MAX_DEV or m.devminor > MAX_DEV:
        raise TarFormatError("a tar member's owner, time or device number is out of range")


def read_up_to(src: Any, n: int) -> bytes:
    """`n` bytes of `src`, fewer only at its end (read in chunks of at most CHUNK)."""
    out = bytearray()
    while len(out) < n:
        chunk = src.read(min(n - len(out), CHUNK))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")


def header_block(block: bytes, short: Exception) -> bool:
    """Whether `block` (read where a tar header belongs) is one: False at the archive's end
    (nothing more, or a zero block); `short` is raised for a partial block, TarFormatError
    for a wrong checksum."""
    if not block or block == bytes(512):
        return False
    if len(block) < 512:
        raise short
    if tar_number(block[148:156]) != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise TarFormatError("a tar header's checksum is wrong")
    return True


def tar_number(fieldb: bytes) -> int:
    """A tar header's number field: octal text, or base-256 (GNU / star)."""
    if fieldb[:1] == b"\x80":                    # base-256 (GNU / star)
        return int.from_bytes(fieldb[1:], "big")
    text = fieldb.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError("a tar header has a malformed number") from None


def _pax_int(pax: dict[str, bytes], key: str, default: int) -> int:
    if key not in pax:
        return default
    try:
        value = int(float(pax[key])) if key == "mtime" else int(pax[key])
    except (ValueError, OverflowError):              # (OverflowError: an mtime of "1e400", inf)
        raise TarFormatError(f"a PAX {key} is malformed") from None
    if value < 0:
        raise TarFormatError(f"a PAX {key} is negative")
    return value


def pax_records(data: bytes) -> dict[str, bytes]:
    """The records of a PAX extended header (keys decoded, values as bytes)."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos, pos + 24)
        try:
            length = int(data[pos:sp]) if sp > pos else -1
        except ValueError:
            length = -1
        if length <= sp - pos or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise TarFormatError("a PAX header is malformed")
        key, eq, value = data[sp + 1:pos + length - 1].partition(b"=")
        if not eq:
            raise TarFormatError("a PAX header is malformed")
        out[_text(key)] = value
        pos += length
    return out
