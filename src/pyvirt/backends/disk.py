"""Opening a disk image in whichever format it is: raw or qcow2.

`open_disk(path, read_only, fmt)` with fmt "auto" probes the file's first bytes
for qcow2's magic.  Probing has a classic hazard: a guest that writes a qcow2
header at the start of its raw disk would, at the next boot, have that disk
opened as qcow2 -- with a backing file of its choosing, say /etc/shadow.  As
QEMU does, a raw image whose format was probed refuses guest writes that would
make its first bytes qcow2's magic; `format=raw` lifts that.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyvirt.backends.block import Buffer, RawFileBackend, advance
from pyvirt.backends.qcow2 import Qcow2Backend
from pyvirt.backends.qcow2_format import MAGIC, probe_format
from pyvirt.errors import ConfigError

FORMATS = ("auto", "raw", "qcow2")


class ProbedRawBackend(RawFileBackend):
    """A raw image opened by probing: its first sector may not become a qcow2 header."""

    def writev(self, offset: int, bufs: Sequence[Buffer]) -> int:
        if offset < len(MAGIC):
            head = bytearray(len(MAGIC))
            self.readinto(0, memoryview(head))
            new = b"".join(bytes(v) for v in advance(bufs, 0))[:len(MAGIC) - offset]
            head[offset:offset + len(new)] = new
            if bytes(head) == MAGIC:
                raise OSError(errno.EPERM, "refusing to write a qcow2 header into a probed raw disk "
                                           "(open it with format=raw)")
        return super().writev(offset, bufs)


def open_disk(path: str | Path, read_only: bool = False, fmt: str = "auto") -> Any:
    """A BlockBackend for the image at `path`; every failure is a one-line ImageError."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown disk format {fmt!r} (known: raw, qcow2)")
    if fmt == "auto":
        if probe_format(path) == "qcow2":
            return Qcow2Backend(path, read_only=read_only)
        return ProbedRawBackend(path, read_only=read_only)
    if fmt == "qcow2":
        return Qcow2Backend(path, read_only=read_only)
    return RawFileBackend(path, read_only=read_only)
