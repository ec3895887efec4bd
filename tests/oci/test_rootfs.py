"""The base disk (pyvirt.oci.rootfs): mke2fs -d as root, and unprivileged with debugfs setting
what the tree could not hold; both disks carry the layers' owners, modes, devices, xattrs and
hard links."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvirt.oci import base_disk, resolve_image
from pyvirt.oci import rootfs as rootfs_mod
from pyvirt.oci import unpack as unpack_mod
from pyvirt.testing import oci as t

pytestmark = pytest.mark.skipif(shutil.which("debugfs") is None or os.geteuid() != 0,
                                reason="needs e2fsprogs' debugfs, and root for the privileged conversion")
PATHS = ("", "bin/busybox", "bin/sh", "etc/passwd", "home/app", "work", "data", "data/file", "data/hard",
         "data/hard2", "data/link", "data/suid", "data/sgid", "data/attr", "data/sticky", "data/null", "opaque",
         "opaque/new", "tmp")


def _meta(disk: Path, rel: str) -> tuple:
    out = subprocess.run(["debugfs", "-R", f'stat "/{rel}"', str(disk)], capture_output=True, text=True).stdout
    kind = re.search(r"Type: (\w+)", out)
    mode = re.search(r"Mode:\s+(\d+)", out)
    ids = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    links = re.search(r"Links: (\d+)", out)
    dev = re.search(r"Device major/minor number: (\d+):(\d+)", out)
    xattrs = sorted(re.findall(r'^\s+(\w+\.\w+) \((\d+)\)', out, re.M))
    assert kind and mode and ids and links, out
    return (kind[1], mode[1], ids.groups(), links[1], dev.groups() if dev else None, xattrs)


def _unprivileged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion as an unprivileged user meets it: no chown (euid != 0), no device nodes,
    no trusted.* or security.* xattrs."""
    real_setxattr = os.setxattr

    def mknod(*_a: object, **_k: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    def setxattr(path: object, key: str, value: bytes, *a: object, **k: object) -> None:
        if not key.startswith("user."):
            raise PermissionError(1, "Operation not permitted")
        real_setxattr(path, key, value, *a, **k)                  # type: ignore[arg-type]
    monkeypatch.setattr(unpack_mod.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(rootfs_mod.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(unpack_mod.os, "mknod", mknod)
    monkeypatch.setattr(unpack_mod.os, "setxattr", setxattr)


def test_root_and_unprivileged_disks_agree(tmp_path, monkeypatch, busybox_layers, busybox_config) -> None:
    t.write_layout(tmp_path / "bb", busybox_config, busybox_layers)
    monkeypatch.setenv("PYVIRT_OCI_CACHE", str(tmp_path / "root-cache"))
    as_root = base_disk(resolve_image(str(tmp_path / "bb"))).disk
    want = {p: _meta(as_root, p) for p in PATHS}
    assert want["data/suid"][:3] == ("regular", "04755", ("0", "0"))
    assert want["data/sgid"][:3] == ("regular", "02711", ("0", "50"))
    assert want["data/file"][2:4] == (("1000", "50"), "3")
    assert want["data/null"][0] == "character" and want["data/null"][4] == ("01", "03")
    assert ("trusted.pyvirt", "1") in want["data/attr"][5] and ("user.pyvirt", "3") in want["data/attr"][5]
    monkeypatch.setenv("PYVIRT_OCI_CACHE", str(tmp_path / "user-cache"))
    _unprivileged(monkeypatch)
    unprivileged = base_disk(resolve_image(str(tmp_path / "bb"))).disk
    got = {p: _meta(unprivileged, p) for p in PATHS}
    assert got == want


@pytest.mark.parametrize("kind", ["dir", "fifo", "symlink"])
def test_account_files_that_are_not_regular_files_read_as_none(tmp_path: Path, kind: str) -> None:
    """Found by fuzz/targets.py's oci: an image whose /etc/passwd is a directory made the
    conversion fail with IsADirectoryError (a traceback, not one line) where it should read no
    accounts; one whose /etc/passwd is a FIFO would have blocked the conversion for ever."""
    import threading

    etc = tmp_path / "etc"
    etc.mkdir()
    if kind == "dir":
        (etc / "passwd").mkdir()
    elif kind == "fifo":
        os.mkfifo(etc / "passwd")
    else:
        (etc / "passwd").symlink_to("/etc/passwd")
    (etc / "group").write_bytes(b"app:x:1000:\n")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(rootfs_mod._account_file(tmp_path, "passwd")), daemon=True)
    reader.start()
    reader.join(5)
    assert got == [b""]
    assert rootfs_mod._account_file(tmp_path, "group") == b"app:x:1000:\n"
