"""The artifact cache under ~/.cache/pyvirt: content keyed, written atomically.

Layout (the root is $PYVIRT_CACHE, else $XDG_CACHE_HOME/pyvirt, else
~/.cache/pyvirt)::

    kernel-<key>/       Image, config, System.map, manifest.json
    initramfs-<key>/    initramfs.cpio, manifest.json
    debian/<sha256>     verified downloads from the Debian archive
    build-tmp/          scratch trees of builds in progress (removed after)
    logs/               build logs (kept, named in error messages)
    locks/              one lock file per artifact, so that two builders
                        of the same artifact wait for each other

An artifact's directory name is a hash of everything that went into it, and
it appears only when complete (built in a temporary directory, then renamed),
so an interrupted build is never taken for a good one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pyvirt.fsutil import cache_root  # noqa: F401 - re-exported (the board's code cache uses it too)


def key(*parts: str | bytes) -> str:
    """A short hash of `parts` (length-prefixed, so ("ab", "c") != ("a", "bc"))."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:20]


def scratch_dir(name: str) -> Path:
    """A fresh, empty build-tmp/<name> for a build's working files (the caller removes it).

    Call it while holding lock(name): what a killed build of the same
    artifact left there is removed first, so scratch trees do not pile up.
    """
    path = cache_root() / "build-tmp" / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def log_path(name: str) -> Path:
    """Where a build writes its log (kept after the build, successful or not)."""
    root = cache_root() / "logs"
    root.mkdir(parents=True, exist_ok=True)
    return root / name


@contextlib.contextmanager
def lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock named `name` (waits while another process holds it)."""
    root = cache_root() / "locks"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / name, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` if the block succeeds.

    The directory is a sibling of `final` (same file system, so the rename is
    atomic).  If the block raises, or `final` already exists when it ends
    (another builder finished first), the temporary directory is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if not final.exists():
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
