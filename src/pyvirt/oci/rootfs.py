"""An image's root file system as a cached, read-only ext4 base disk, one per image.

    oci/images/<config hex>/rootfs.ext4     the layers applied in order (unpack.py), written by
                                            mke2fs -d; mode 0444: VMs boot qcow2 overlays on it
    oci/images/<config hex>/config.json     the image config (what the container runs)
    oci/images/<config hex>/passwd, group   the image's /etc/passwd and /etc/group (for -u NAME)

The directory appears only when complete (images/cache.py's `building`), so a second run of the
same image neither downloads nor converts anything.  e2fsprogs' `mke2fs -d` (1.47 in Debian 12)
copies each file's mode, uid, gid, xattrs and hard links from the tree it is given; run as
root, the tree holds the layers' ownership, so the disk does too.  Unprivileged, the tree can
hold neither other owners nor device nodes, so the disk would be wrong: converting needs root
(one line says so).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pyvirt.images import cache
from pyvirt.oci.source import Image
from pyvirt.oci.store import BlobStore, OciError, oci_root
from pyvirt.oci.unpack import apply_layers

MAX_ACCOUNTS = 1 << 20          # /etc/passwd or /etc/group kept for user lookups
FREE_SPACE = 1 << 30            # room the container may write (the file is sparse)


@dataclass(frozen=True)
class BaseDisk:
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "rootfs.ext4"

    def config(self) -> dict:
        from pyvirt.oci.store import parse_json
        return parse_json((self.dir / "config.json").read_bytes(), "the image config")

    def accounts(self, name: str) -> str:
        try:
            return (self.dir / name).read_text("utf-8", "replace")
        except OSError:
            return ""


def cached_base_disk(img: Image) -> BaseDisk | None:
    d = BaseDisk(oci_root() / "images" / img.digest[7:])
    return d if d.disk.is_file() else None


def base_disk(img: Image, store: BlobStore | None = None, limit: int | None = None) -> BaseDisk:
    """The image's base disk, converted now if it is not cached."""
    found = cached_base_disk(img)
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise OciError(f"{img.source}: converting an image to a disk needs root the first time (its files' "
                       "owners and device nodes); run it once as root")
    store = store or BlobStore()
    final = oci_root() / "images" / img.digest[7:]
    name = f"oci-{img.digest[7:27]}"
    with cache.lock(name):
        found = cached_base_disk(img)
        if found is not None:
            return found
        scratch = cache.scratch_dir(name)
        try:
            tree = scratch / "rootfs"
            tree.mkdir(mode=0o755)
            apply_layers(tree, store, img.layers, img.diff_ids, limit)
            with cache.building(final) as out:
                used, inodes = _usage(tree)
                size = (used * 5 // 4 + FREE_SPACE + inodes * 256 + (16 << 20) + (1 << 20) - 1) & ~((1 << 20) - 1)
                log = cache.log_path(f"{name}.log")
                cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "oci-root", "-N", str(inodes + 4096),
                       "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", str(tree), str(out / "rootfs.ext4"),
                       f"{size >> 20}M"]
                with open(log, "ab") as f:
                    try:
                        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           timeout=3600)
                    except FileNotFoundError:
                        raise OciError("mke2fs is not installed (e2fsprogs)") from None
                if p.returncode != 0:
                    raise OciError(f"{img.source}: mke2fs failed with status {p.returncode} (log: {log})")
                os.chmod(out / "rootfs.ext4", 0o444)
                (out / "config.json").write_text(json.dumps(img.config))
                for acct in ("passwd", "group"):
                    (out / acct).write_bytes(_account_file(tree, acct))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return BaseDisk(final)


def _usage(tree: Path) -> tuple[int, int]:
    """(bytes the tree takes in 4 KiB blocks, hard links counted once; inodes)."""
    seen: set[int] = set()
    used = inodes = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            inodes += 1
            used += (st.st_size + 4095) & ~4095 if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) else 4096
    return used, inodes + 1


def _account_file(tree: Path, name: str) -> bytes:
    """The image's etc/NAME when it is a regular file (never a link followed), at most MAX_ACCOUNTS."""
    path = tree / "etc" / name
    try:
        if stat.S_ISLNK(os.lstat(tree / "etc").st_mode):
            return b""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return b""
        return f.read(MAX_ACCOUNTS)
