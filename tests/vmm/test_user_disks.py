"""Snapshots of a VM on the user's own disk (issue 18, item 1): the snapshot keeps a copy,
the VM keeps writing the user's file, and frozen images are checked on restore."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.backends.disk import open_disk
from pyvirt.backends.qcow2_tools import create_qcow2
from pyvirt.errors import ConfigError, ImageError
from pyvirt.spec import DiskSpec, make_spec
from pyvirt.vmm.restore import load_snapshot
from pyvirt.vmm.snapshot import save_snapshot
from pyvirt.vmm.vm import Vm

MIB = 1 << 20


def read4(path: Path, fmt: str = "auto") -> bytes:
    buf = bytearray(4)
    with contextlib.closing(open_disk(path, read_only=True, fmt=fmt)) as b:
        b.readinto(0, memoryview(buf))
    return bytes(buf)


def write4(backend: object, data: bytes) -> None:
    backend.writev(0, [data])                       # type: ignore[attr-defined]
    backend.flush()                                 # type: ignore[attr-defined]


def users_disk(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """The user's disk with "ORIG" at offset 0: raw, qcow2, or qcow2 over a raw backing
    file named relative to the overlay (as `qemu-img create -b base.raw` writes it)."""
    home = tmp_path / "home"
    home.mkdir()
    if kind == "raw":
        disk = home / "disk.raw"
        disk.write_bytes(b"ORIG" + bytes(8 * MIB - 4))
        return disk, "raw"
    disk = home / "disk.qcow2"
    if kind == "qcow2":
        create_qcow2(disk, 8 * MIB)
        b = open_disk(disk, fmt="qcow2")
        write4(b, b"ORIG")
        b.close()
    else:
        (home / "base.raw").write_bytes(b"ORIG" + bytes(8 * MIB - 4))
        cwd = os.getcwd()
        os.chdir(home)
        try:
            create_qcow2("disk.qcow2", None, backing="base.raw", backing_format="raw")
        finally:
            os.chdir(cwd)
    return disk, "qcow2"


@pytest.mark.parametrize("kind", ["raw", "qcow2", "qcow2-backing"])
def test_vm_keeps_writing_the_users_disk_after_a_snapshot(program: Path, tmp_path: Path, kind: str) -> None:
    disk, fmt = users_disk(tmp_path, kind)
    spec = make_spec(bios=str(program), memory=16 << 20, engine="interp", disks=[DiskSpec(path=disk, format=fmt)])
    vm = Vm(spec, BufferBackend())
    snap = tmp_path / "snap"
    try:
        vm.run(max_instructions=20_000)
        save_snapshot(vm, snap, then="continue")
        assert Path(vm.spec.disks[0].path) == disk            # still the user's file...
        write4(vm.board.backends[0], b"NEW!")                  # ...which the guest's writes reach
    finally:
        vm.close()
    assert read4(disk, fmt) == b"NEW!"
    assert disk.stat().st_mode & 0o200                          # never frozen, never read-only
    assert not (snap / "live").exists()
    m = json.loads((snap / "manifest.json").read_text())
    assert m["disks"][0]["copied_from"] == str(disk)
    assert not (snap / "disk0.img").stat().st_mode & 0o222

    # The user's file goes on being theirs (another VM writes it): the snapshot is unmoved.
    again = open_disk(disk, fmt=fmt)
    write4(again, b"LATE")
    again.close()
    back = load_snapshot(snap, BufferBackend())
    try:
        buf = bytearray(4)
        back.board.backends[0].readinto(0, memoryview(buf))
        assert bytes(buf) == b"ORIG"
    finally:
        back.close()
    assert read4(disk, fmt) == b"LATE"


def test_a_changed_copy_is_refused_on_restore(program: Path, tmp_path: Path) -> None:
    disk, fmt = users_disk(tmp_path, "raw")
    spec = make_spec(bios=str(program), memory=16 << 20, engine="interp", disks=[DiskSpec(path=disk, format=fmt)])
    vm = Vm(spec, BufferBackend())
    vm.run(max_instructions=20_000)
    save_snapshot(vm, tmp_path / "snap", then="quit")
    vm.close()
    copy = tmp_path / "snap" / "disk0.img"
    with pytest.raises(ImageError, match="read-only"):        # pyvirt does not write it, even as root
        open_disk(copy, fmt="raw")
    copy.chmod(0o644)                                          # a writer that ignores all that
    with open(copy, "r+b") as f:
        f.write(b"EVIL")
    with pytest.raises(ConfigError, match="disk0.img changed since the snapshot"):
        load_snapshot(tmp_path / "snap", BufferBackend())


def test_an_image_frozen_in_place_is_checked_on_restore(program: Path, tmp_path: Path) -> None:
    """pyvirt's own images (a pyvirtd VM's directory: `own_dir`) are frozen in place; one
    changed afterwards (by root, say) is refused."""
    disk, fmt = users_disk(tmp_path, "raw")
    spec = make_spec(bios=str(program), memory=16 << 20, engine="interp", disks=[DiskSpec(path=disk, format=fmt)])
    vm = Vm(spec, BufferBackend())
    vm.run(max_instructions=20_000)
    save_snapshot(vm, tmp_path / "snap", then="quit", own_dir=disk.parent)
    vm.close()
    assert not (tmp_path / "snap" / "disk0.img").exists() and not disk.stat().st_mode & 0o222
    load_snapshot(tmp_path / "snap", BufferBackend()).close()
    with pytest.raises(ImageError, match="read-only"):
        open_disk(disk, fmt="raw")
    disk.chmod(0o644)
    with open(disk, "r+b") as f:
        f.write(b"EVIL")
    with pytest.raises(ConfigError, match="frozen image .* changed since the snapshot"):
        load_snapshot(tmp_path / "snap", BufferBackend())
