"""Containers inside VMs: an OCI image run as a VM (`pyvirt run --oci IMAGE [CMD...]`).

    store.py    the content-addressed blob cache (~/.cache/pyvirt/oci), digest-checked writes
    tar.py      a strict, bounded reader of layer tars
    source.py   image sources: OCI layout directory, docker save tarball, registry (API v2)
    unpack.py   layers applied in order (whiteouts, opaque dirs, owners, modes, xattrs, links)
    rootfs.py   the cached read-only ext4 base disk per image
    guest.py    the container contract inside the VM (init, PID 1 helper, process spec)

`container_guest()` is the one entry request.resolve() calls.  docs/oci.md has the details.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvirt.oci.guest import RunOptions, append, initrd, process
from pyvirt.oci.rootfs import BaseDisk, base_disk
from pyvirt.oci.source import Image, resolve_image
from pyvirt.oci.store import BlobStore, OciError, oci_root

__all__ = ["BaseDisk", "BlobStore", "ContainerGuest", "Image", "OciError", "RunOptions", "base_disk",
           "container_guest", "resolve_image"]


@dataclass
class ContainerGuest:
    """What a container VM boots: the default kernel, this run's initrd, a root overlay."""

    initrd: Path
    append: str
    root: Path                          # the qcow2 overlay over the base disk
    tmp: Any = None                     # a TemporaryDirectory to clean up (pyvirt run)


def container_guest(ref: str, opts: RunOptions, base_initrd: Path, keep: str | None = None,
                    persistent: bool = False) -> ContainerGuest:
    """Resolve image `ref` (pulling and converting what is not cached) and write this run's
    initrd and root overlay: in a temporary directory, or (`persistent`, pyvirtd) the initrd
    in the cache by content and the overlay at `keep`."""
    import hashlib

    from pyvirt.backends.qcow2_tools import create_qcow2
    img = resolve_image(ref)
    disk = base_disk(img)
    proc = process(disk.config(), opts, disk.accounts("passwd"), disk.accounts("group"))
    tmp = None if persistent else tempfile.TemporaryDirectory(prefix="pyvirt-oci-")
    try:
        if tmp is None:
            key = hashlib.sha256(base_initrd.read_bytes() + b"\0" + proc.spec()).hexdigest()[:24]
            rd = oci_root() / "initrd" / f"{key}.cpio"
            if not rd.is_file():
                initrd(base_initrd, proc, rd)
        else:
            rd = initrd(base_initrd, proc, Path(tmp.name) / "initrd.cpio")
        root = Path(keep) if keep is not None else Path(tmp.name if tmp else tempfile.mkdtemp()) / "root.qcow2"
        if not root.exists():
            create_qcow2(str(root), None, backing=str(disk.disk), backing_format="raw")
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    return ContainerGuest(rd, append(opts.stdio, opts.hostname), root, tmp)
