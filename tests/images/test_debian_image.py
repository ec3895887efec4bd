"""The Debian image's host-side pieces: guest files, initramfs, cache lookup, root overlays."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pyvirt.backends.qcow2_tools import describe_image
from pyvirt.images import debian_image as di
from pyvirt.images.cpio import read_newc
from pyvirt.testing.images import fake_module


def test_guest_files_are_installed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    di.install_guest_files(root)
    assert (root / "etc/hostname").read_text() == "debian\n"
    assert "/dev/vda\t/\text4" in (root / "etc/fstab").read_text()
    runner = root / "usr/local/sbin/pyvirt-command"
    assert runner.stat().st_mode & 0o111 and runner.read_bytes() == di.data_file("pyvirt-command")
    link = root / "etc/systemd/system/multi-user.target.wants/pyvirt-command.service"
    assert link.is_symlink() and str(link.readlink()) == "/etc/systemd/system/pyvirt-command.service"
    unit = (root / "etc/systemd/system/pyvirt-command.service").read_text()
    assert "ExecStart=/usr/local/sbin/pyvirt-command" in unit and "ConditionKernelCommandLine=pyvirt.cmd" in unit
    assert (root / "pyvirt-setup").read_bytes() == di.data_file("setup")
    di.install_guest_files(root)            # again: idempotent
    assert link.is_symlink()


def test_guest_scripts_are_valid_shell() -> None:
    for name in ("init", "setup", "pyvirt-command"):
        p = subprocess.run(["sh", "-n"], input=di.data_file(name), capture_output=True)
        assert p.returncode == 0, (name, p.stderr)


def test_initramfs_holds_modules_in_order() -> None:
    mods = [("virtio_mmio", fake_module({"name": ["virtio_mmio"]})), ("ext4", fake_module({"name": ["ext4"]}))]
    data = di.make_debian_initramfs(b"\x7fELFbusybox", ["bin/sh", "sbin/insmod"], mods)
    entries = {e.name: e for e in read_newc(data)}
    assert entries["modules/order"].data == b"virtio_mmio\next4\n"
    assert entries["modules/ext4.ko"].data == mods[1][1]
    assert entries["init"].data == di.data_file("init")
    assert "newroot" in entries and entries["bin/sh"].data == b"/bin/busybox"


def _fake_build(final: Path, **manifest: object) -> None:
    final.mkdir(parents=True)
    for name in ("Image", "initrd.cpio", "disk.img"):
        (final / name).write_bytes(b"x")
    m = {"version": di.DEBIAN_IMAGE_VERSION, "scripts_sha256": di.scripts_digest(),
         "packages": list(di.PACKAGES), "built": "2026-01-01T00:00:00Z"}
    m.update(manifest)
    (final / "manifest.json").write_text(json.dumps(m))


def test_cache_lookup_takes_the_newest_current_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVIRT_CACHE", str(tmp_path))
    assert di.cached_debian_image() is None
    _fake_build(tmp_path / "debian-old", built="2026-01-01T00:00:00Z")
    _fake_build(tmp_path / "debian-new", built="2026-02-01T00:00:00Z")
    _fake_build(tmp_path / "debian-stale", built="2026-03-01T00:00:00Z", scripts_sha256="0" * 64)
    _fake_build(tmp_path / "debian-otherpkgs", built="2026-03-01T00:00:00Z", packages=["bash"])
    found = di.cached_debian_image()
    assert found is not None and found.disk == tmp_path / "debian-new/disk.img"
    (tmp_path / "debian-new/disk.img").unlink()                 # incomplete: skipped
    found = di.cached_debian_image()
    assert found is not None and found.disk == tmp_path / "debian-old/disk.img"
    (tmp_path / "debian-old/manifest.json").write_text("{broken")
    assert di.cached_debian_image() is None
    with pytest.raises(Exception, match="pyvirt image build debian"):
        di.debian_image(build=False)


def test_root_overlays(tmp_path: Path) -> None:
    base = tmp_path / "disk.img"
    base.write_bytes(b"\0" * (4 << 20))
    img = di.DebianImage(tmp_path / "Image", tmp_path / "initrd.cpio", base)
    path, tmp = di.root_overlay(img, None)
    assert tmp is not None and path.is_file()
    info = describe_image(str(path))
    assert info["format"] == "qcow2" and info["virtual_size"] == 4 << 20
    assert info["backing_file"] == str(base)
    tmp.cleanup()
    assert not path.exists()
    keep = tmp_path / "mine.qcow2"
    path, tmp = di.root_overlay(img, str(keep))
    assert tmp is None and path == keep and keep.is_file()
    before = keep.read_bytes()
    di.root_overlay(img, str(keep))         # an existing root disk is used, not remade
    assert keep.read_bytes() == before


def test_guest_networking_is_dhcp_on_ethernet(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    di.install_guest_files(root)
    text = (root / "etc/systemd/network/80-pyvirt-dhcp.network").read_text()
    assert "Type=ether" in text and "DHCP=yes" in text
    assert b"systemctl enable systemd-networkd" in di.data_file("setup")
