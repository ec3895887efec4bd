"""An image's root file system as a cached, read-only ext4 base disk, one per image.

    oci/images/<config hex>/rootfs.ext4     the layers applied in order (unpack.py), written by
                                            mke2fs -d; mode 0444: VMs boot qcow2 overlays on it
    oci/images/<config hex>/config.json     the image config (what the container runs)
    oci/images/<config hex>/passwd, group   the image's /etc/passwd and /etc/group (for -u NAME)

The directory appears only when complete (images/cache.py's `building`), so a second run of the
same image neither downloads nor converts anything.  e2fsprogs' `mke2fs -d` (1.47 in Debian 12)
copies each file's mode, uid, gid, xattrs and hard links from the tree it is given; run as
root, the tree holds the layers' ownership, so the disk does too.  Unprivileged, the tree can
hold neither other owners, nor device nodes, nor setgid bits of groups the user is not in, nor
trusted.* and security.* xattrs: unpack.py records what each path should have, and one
`debugfs -w` script then sets owner, group and mode of every path, makes the device nodes and
sets the xattrs on the disk itself (paths with a quote, a backslash or a newline are refused
there, debugfs's command syntax cannot carry them).
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
from pyvirt.oci.store import BlobStore, OciError, oci_root, reader
from pyvirt.oci.unpack import Record, apply_layers

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
            record: Record | None = None if os.geteuid() == 0 else {}
            apply_layers(tree, store, img.layers, img.diff_ids, limit, record)
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
                if record is not None:
                    _set_metadata(out / "rootfs.ext4", tree, record, scratch, log)
                os.chmod(out / "rootfs.ext4", 0o444)
                (out / "config.json").write_text(json.dumps(img.config))
                for acct in ("passwd", "group"):
                    (out / acct).write_bytes(_account_file(tree, acct))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return BaseDisk(final)


def _set_metadata(disk: Path, tree: Path, record: Record, scratch: Path, log: Path) -> None:
    """Owners, modes, device nodes and xattrs the unprivileged tree could not hold, set on the
    disk with one debugfs script."""
    lines = ['set_inode_field / uid 0', 'set_inode_field / gid 0']
    values = scratch / "xattrs"
    values.mkdir()
    for n, (rel, (kind, uid, gid, mode, xattrs, dev)) in enumerate(sorted(record.items())):
        if any(c in rel for c in '"\\\n'):
            raise OciError(f"{rel[:80]!r}: a path debugfs cannot name (converting unprivileged; run as root)")
        path = f'"/{rel}"'
        if kind in ("char", "block"):
            parent = os.path.dirname(rel)
            if parent and not os.path.isdir(tree / parent):
                continue
            if any(c.isspace() for c in rel):
                raise OciError(f"{rel[:80]!r}: a device path debugfs cannot name (converting unprivileged; "
                               "run as root)")
            # debugfs's mknod names the node in its working directory, unquoted
            lines += [f'cd "/{parent}"', f"mknod {os.path.basename(rel)} {'c' if kind == 'char' else 'b'} "
                      f"{dev[0]} {dev[1]}", "cd /"]
            ftype = stat.S_IFCHR if kind == "char" else stat.S_IFBLK
        else:
            try:
                ftype = stat.S_IFMT(os.lstat(tree / rel).st_mode)
            except FileNotFoundError:
                continue                       # removed by a later layer
        lines += [f"set_inode_field {path} uid {uid}", f"set_inode_field {path} gid {gid}"]
        if not stat.S_ISLNK(ftype):
            lines.append(f"set_inode_field {path} mode 0{ftype | mode:o}")
        for i, (key, value) in enumerate(xattrs.items()):
            if any(c in key for c in '"\\\n '):
                continue
            f = values / f"{n}-{i}"
            f.write_bytes(value)
            lines.append(f'ea_set -f {f} {path} "{key}"')
    script = scratch / "metadata.debugfs"
    script.write_text("\n".join(lines) + "\n")
    try:
        p = subprocess.run(["debugfs", "-w", "-f", str(script), str(disk)], capture_output=True, text=True,
                           timeout=3600)
    except FileNotFoundError:
        raise OciError("debugfs is not installed (e2fsprogs)") from None
    errors = [line for line in p.stderr.splitlines() if line and not line.startswith("debugfs ")]
    with open(log, "a") as logf:
        logf.write(p.stderr)
    if p.returncode != 0 or errors:
        raise OciError(f"setting owners on the disk failed: {(errors or ['debugfs failed'])[0][:200]} (log: {log})")


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
    try:
        if stat.S_ISLNK(os.lstat(tree / "etc").st_mode):
            return b""
        with reader(tree / "etc" / name) as f:
            data: bytes = f.read(MAX_ACCOUNTS)
            return data
    except (OSError, OciError):
        return b""
