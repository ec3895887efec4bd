"""The content-addressed blob cache shared by every image: ~/.cache/pyvirt/oci.

    oci/blobs/sha256/<hex>     a blob, there only once its bytes hashed to <hex>
    oci/refs/<key>.json        what an image source last resolved to (a tag, a layout, a
                               docker archive by path, size and mtime): the manifest's digest
    oci/images/<hex>/          the base disk and run data of the image whose config is <hex>

A blob is written to a temporary file beside its final name while it is hashed and renamed
only when the digest matched and its length is within the caller's bound: an interrupted or
tampered download leaves nothing under its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyvirt.errors import ImageError
from pyvirt.fsutil import NotRegularFile, open_regular
from pyvirt.images import cache

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_JSON = 4 << 20              # a manifest, an index or a config
MAX_BLOB = 16 << 30             # one layer as stored (compressed)


class OciError(ImageError):
    """An image could not be found, fetched, checked or unpacked (one line)."""


def check_digest(digest: Any, what: str) -> str:
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise OciError(f"{what}: {str(digest)[:80]!r} is not a sha256 digest")
    return digest


def oci_root() -> Path:
    """$PYVIRT_OCI_CACHE, else the oci directory of the pyvirt cache."""
    env = os.environ.get("PYVIRT_OCI_CACHE")
    return Path(env) if env else cache.cache_root() / "oci"


class BlobStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or oci_root()

    def path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / check_digest(digest, "blob")[7:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def _receive(self, chunks: Iterable[bytes], limit: int, too_big: str) -> tuple[str, str]:
        """`chunks` written to a new temporary file beside the blobs: its path and the bytes'
        SHA-256 (hex); OciError(`too_big`) past `limit` bytes, nothing left behind."""
        d = self.root / "blobs" / "sha256"
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=d)
        try:
            h = hashlib.sha256()
            total = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    total += len(chunk)
                    if total > limit:
                        raise OciError(too_big)
                    h.update(chunk)
                    f.write(chunk)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp, h.hexdigest()

    def _keep(self, tmp: str, digest: str) -> None:
        """The received file `tmp` becomes blob `digest` (read-only) unless it is there already."""
        try:
            if not self.has(digest):
                os.chmod(tmp, 0o444)
                os.replace(tmp, self.path(digest))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put(self, digest: str, chunks: Iterable[bytes], limit: int = MAX_BLOB, what: str = "blob") -> Path:
        """Store the bytes of `chunks` as `digest`: refused (nothing kept) when they hash to
        anything else or pass `limit` bytes."""
        final = self.path(digest)
        if final.is_file():
            return final
        tmp, got = self._receive(chunks, limit, f"{what} {digest[:19]}: larger than {limit} bytes")
        if "sha256:" + got != digest:
            os.unlink(tmp)
            raise OciError(f"{what} {digest[:19]}: digest mismatch (got sha256:{got[:12]}), refused")
        self._keep(tmp, digest)
        return final

    def put_unknown(self, chunks: Iterable[bytes], limit: int, too_big: str) -> str:
        """Store a blob whose digest is learnt by reading it (a docker archive's members)."""
        tmp, got = self._receive(chunks, limit, too_big)
        self._keep(tmp, "sha256:" + got)
        return "sha256:" + got

    def put_bytes(self, digest: str, data: bytes, what: str = "blob") -> Path:
        return self.put(digest, [data], len(data), what)

    def json(self, digest: str, what: str) -> dict[str, Any]:
        """A stored JSON blob (a manifest, an index or a config): at most MAX_JSON bytes, an object."""
        with open(self.path(digest), "rb") as f:
            data = f.read(MAX_JSON + 1)
        return parse_json(data, what)

    def ref(self, key: str) -> dict[str, Any] | None:
        try:
            return parse_json((self.root / "refs" / f"{key}.json").read_bytes(), "ref")
        except (OSError, OciError):
            return None

    def set_ref(self, key: str, value: dict[str, Any]) -> None:
        cache.write_atomic(self.root / "refs" / f"{key}.json", json.dumps(value).encode())


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_JSON:
        raise OciError(f"{what} is larger than {MAX_JSON} bytes")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise OciError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise OciError(f"{what} is not a JSON object")
    return value


def file_chunks(f: Any, size: int = 1 << 20) -> Iterable[bytes]:
    return iter(lambda: f.read(size), b"")


def reader(path: Path) -> Any:
    """`path` opened for reading without following a symlink at its last component; a
    regular file only (a directory or a FIFO -- opened without waiting for a writer -- is
    refused): fsutil.open_regular, its errors in the OCI code's words."""
    try:
        return open_regular(path, follow=False)
    except NotRegularFile:
        raise OciError(f"{path}: not a regular file") from None
    except OSError as e:
        raise OciError(f"{path}: cannot read it ({e.strerror})") from None
