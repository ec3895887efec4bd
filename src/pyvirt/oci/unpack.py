"""Image layers applied in order onto a directory: the image's root file system.

Each layer is a tar (plain, gzip or zstd, told by its first bytes) read with the bounded
TarReader.  Member names are relative paths: an absolute name or a `..` component refuses the
layer, and so does any write whose parent path passes through a symlink (every component is
lstat'ed; nothing is followed), so nothing is ever written outside the root.  Whiteouts
(`.wh.NAME`) remove NAME from the layers below, an opaque marker (`.wh..wh..opq`) empties its
directory of what the layers below put there; ownership, modes (setuid, setgid, sticky), xattrs,
hard links, symlinks, devices and FIFOs are kept (ownership, devices and xattrs other than
user.* need root).  The uncompressed stream of layer i must hash to the config's diff_ids[i],
and the image may unpack to at most MAX_UNPACKED bytes in MAX_ENTRIES members (a decompression
bomb stops there, having written at most that much into the scratch directory).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import stat
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zstandard

from pyvirt.oci.store import BlobStore, OciError
from pyvirt.oci.tar import Member, TarFormatError, TarReader

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_UNPACKED = 64 << 30
MAX_ENTRIES = 4_000_000


class _Budget:
    """What an image may still unpack: bytes of decompressed stream, and members."""

    def __init__(self, limit: int, entries: int) -> None:
        self.left, self.entries = limit, entries
        self.limit = limit


class _Counted:
    """A decompressed stream, hashed (for diff_ids) and counted against the budget."""

    def __init__(self, src: Any, budget: _Budget, what: str) -> None:
        self.src, self.budget, self.what = src, budget, what
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        try:
            data: bytes = self.src.read(n)
        except (OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError) as e:
            raise OciError(f"{self.what}: cannot decompress it ({e})") from None
        self.budget.left -= len(data)
        if self.budget.left < 0:
            raise OciError(f"{self.what}: the image unpacks to more than {self.budget.limit} bytes "
                           "(a decompression bomb?), refused")
        self.hash.update(data)
        return data


def _open_layer(f: Any) -> Any:
    head = f.peek(4)[:4] if hasattr(f, "peek") else b""
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if head == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return f


Record = dict[str, tuple[str, int, int, int, dict[str, bytes], tuple[int, int]]]


def apply_layers(root: Path, store: BlobStore, layers: Sequence[str], diff_ids: Sequence[str],
                 limit: int | None = None, record: Record | None = None) -> None:
    """Unpack `layers` (blob digests, bottom first) onto the directory `root`.  With `record`
    (unprivileged), what the tree cannot hold is written there for each path: {path: (kind,
    uid, gid, mode, xattrs, device numbers)} (rootfs.py sets it on the disk afterwards)."""
    budget = _Budget(MAX_UNPACKED if limit is None else limit, MAX_ENTRIES)
    for i, digest in enumerate(layers):
        what = f"layer {i + 1} ({digest[7:19]})"
        with open(store.path(digest), "rb") as raw:
            stream = _Counted(_open_layer(raw), budget, what)
            try:
                _apply(root, TarReader(stream), budget, what, record)
                while stream.read(1 << 20):
                    pass                               # the rest counts for the diff_id
            except TarFormatError as e:
                raise OciError(f"{what}: {e}") from None
            except OSError as e:                       # (a name too long, a device refused, ENOSPC)
                name = os.path.basename(e.filename) if isinstance(e.filename, str) else ""
                raise OciError(f"{what}: cannot write {name[:100]!r} here: {e.strerror or e}") from None
        got = "sha256:" + stream.hash.hexdigest()
        if i < len(diff_ids) and got != diff_ids[i]:
            raise OciError(f"{what}: its content does not match the config's diff_id {diff_ids[i][:19]}, refused")


def _parts(name: str, what: str) -> list[str]:
    if name.startswith("/"):
        raise OciError(f"{what}: absolute path {name[:100]!r} refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OciError(f"{what}: path {name[:100]!r} leaves the root (..), refused")
    return parts


def _parent(root: Path, parts: list[str], what: str, name: str, create: bool = True) -> Path | None:
    """The directory holding parts[-1]: every component a real directory under `root` (made
    when missing, if `create`), never a symlink."""
    d = root
    for k, p in enumerate(parts[:-1]):
        d = d / p
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(d, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise OciError(f"{what}: {name[:100]!r} goes through the symlink {'/'.join(parts[:k + 1])}, refused")
        if not stat.S_ISDIR(st.st_mode):
            raise OciError(f"{what}: {name[:100]!r} goes through {p!r}, which is not a directory")
    return d


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _apply(root: Path, tar: TarReader, budget: _Budget, what: str, record: Record | None) -> None:
    mine: set[str] = set()               # paths this layer wrote (an opaque marker keeps them)
    dirs: list[tuple[Path, Member]] = []
    while (m := tar.next()) is not None:
        budget.entries -= 1
        if budget.entries < 0:
            raise OciError(f"{what}: the image has more than {MAX_ENTRIES} members, refused")
        parts = _parts(m.name, what)
        if not parts:
            continue                       # the root itself
        base = parts[-1]
        if base.startswith(WHITEOUT):
            parent = _parent(root, parts, what, m.name, create=False)
            if parent is None:
                continue
            if base == OPAQUE:
                prefix = "/".join(parts[:-1])
                for child in os.listdir(parent):
                    rel = f"{prefix}/{child}" if prefix else child
                    if rel not in mine:
                        _remove(parent / child)
            else:
                _remove(parent / base[len(WHITEOUT):])
            continue
        parent = _parent(root, parts, what, m.name)
        assert parent is not None
        dest = parent / base
        mine.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
        try:
            st: os.stat_result | None = os.lstat(dest)
        except FileNotFoundError:
            st = None
        if st is not None and not (m.kind == "dir" and stat.S_ISDIR(st.st_mode)):
            _remove(dest)
        if m.kind == "dir":
            if st is None or not stat.S_ISDIR(st.st_mode):
                os.mkdir(dest, 0o700)
            dirs.append((dest, m))            # modes last: a 0555 directory still takes its files
            if record is not None:
                record["/".join(parts)] = (m.kind, m.uid, m.gid, m.mode, m.xattrs, (0, 0))
            continue
        if m.kind == "file":
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                while data := tar.read():
                    f.write(data)
        elif m.kind == "symlink":
            os.symlink(m.linkname, dest)
        elif m.kind == "hardlink":
            tparts = _parts(m.linkname, what)
            tparent = _parent(root, tparts, what, m.linkname, create=False) if tparts else None
            target = tparent / tparts[-1] if tparent is not None else None
            if target is None or not os.path.lexists(target) or os.path.isdir(target) and not os.path.islink(target):
                raise OciError(f"{what}: hard link {m.name[:100]!r} to {m.linkname[:100]!r}, which is not a file here")
            os.link(target, dest, follow_symlinks=False)
            continue                             # a hard link shares its target's metadata
        else:
            kind = {"char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}[m.kind]
            try:
                os.mknod(dest, kind | 0o600, os.makedev(m.devmajor, m.devminor) if m.kind != "fifo" else 0)
            except PermissionError:              # devices need root: recorded for the disk
                if record is not None:
                    record["/".join(parts)] = (m.kind, m.uid, m.gid, m.mode, m.xattrs, (m.devmajor, m.devminor))
                continue
        _metadata(dest, m)
        if record is not None:
            record["/".join(parts)] = (m.kind, m.uid, m.gid, m.mode, m.xattrs, (0, 0))
    for dest, m in reversed(dirs):
        _dir_metadata(root, dest, m)


def _dir_metadata(root: Path, dest: Path, m: Member) -> None:
    """A directory's owner, mode, xattrs and times, set last (a 0555 directory still took
    its files) through a descriptor reached from `root` one component at a time without
    following a symlink.  Later members may have replaced the directory or a directory
    above it with a symlink (to "/", say): then it is no longer in the tree and nothing is
    set, rather than chmod following the link out of the root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in dest.relative_to(root).parts:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError, OSError) as e:
                if isinstance(e, (FileNotFoundError, NotADirectoryError)) or e.errno == errno.ELOOP:
                    return                       # replaced or removed by a later member
                raise
            os.close(fd)
            fd = nxt
        _metadata(fd, m)
    finally:
        os.close(fd)


def _metadata(dest: Path | int, m: Member) -> None:
    """Owner, mode, xattrs and times of `dest`: a path (a member just made, never followed
    if a symlink) or a descriptor (`_dir_metadata`'s)."""
    follow = isinstance(dest, int)               # (a descriptor has nothing to follow; a path never is)
    if os.geteuid() == 0:
        os.chown(dest, m.uid, m.gid, follow_symlinks=follow)
    if m.kind != "symlink":
        os.chmod(dest, m.mode)
    for key, value in m.xattrs.items():
        try:
            os.setxattr(dest, key, value, follow_symlinks=follow)
        except OSError:
            pass                                 # (a namespace this file system or user cannot set)
    os.utime(dest, ns=(m.mtime * 10**9, m.mtime * 10**9), follow_symlinks=follow)
