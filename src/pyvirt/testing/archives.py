"""Hand-made export archives for tests of the import checks (host/archive.py's format):
any manifest, any members, cut short on demand."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import zstandard

from pyvirt.host import archive


def write_archive(path: Path, manifest: dict[str, Any] | bytes, members: list[tuple[tarfile.TarInfo, bytes]],
                  cut: int | None = None) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        head = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        ti = tarfile.TarInfo(archive.MANIFEST)
        ti.size = len(head)
        tar.addfile(ti, io.BytesIO(head))
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if ti.isfile() else None)
    data = zstandard.ZstdCompressor().compress(buf.getvalue())
    path.write_bytes(data[:cut] if cut else data)
    return path


def member(name: str, data: bytes = b"x" * 10, kind: bytes = tarfile.REGTYPE) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        ti.linkname = "/etc/passwd"
    return ti, data
