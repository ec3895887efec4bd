"""An export archive is a hostile file: an imported VM (and the snapshot in the archive) gets
only what the importing user asked for -- no host paths, sockets, networks or limits taken
from the file, disks opened as the raw images the archive format says they are."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from pyvirt.backends.block import RawFileBackend
from pyvirt.backends.disk import open_disk
from pyvirt.backends.qcow2_tools import create_qcow2
from pyvirt.host import archive
from pyvirt.host.client import ApiError
from pyvirt.testing.archives import member, write_archive
from pyvirt.testing.daemon import Daemon
from pyvirt.vmm import snapshot as fmt


@pytest.fixture
def daemon(state_dir: Path):   # noqa: ANN201 -- these tests boot nothing: no default image needed
    d = Daemon(state_dir)
    try:
        yield d
    finally:
        d.cleanup()

SECRET = b"TOP-SECRET-HOST-FILE\n"


def evil_disk(tmp_path: Path) -> bytes:
    """A qcow2 image whose backing file is a host file the guest must never see."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + bytes(65536 - len(SECRET)))
    img = tmp_path / "evil.qcow2"
    create_qcow2(img, 65536, backing=secret, backing_format="raw")
    return img.read_bytes()


def test_import_takes_no_host_settings_from_the_archive(daemon: Daemon, tmp_path: Path) -> None:
    disk = evil_disk(tmp_path)
    m = {"format": "pyvirt-export", "version": 1, "name": "imp",
         "members": {"boot/kernel": 10, "disks/disk0.raw": len(disk)},
         "spec": {"memory": 64 << 20, "kernel": "boot/kernel",
                  "disks": [{"path": "disks/disk0.raw", "format": "qcow2"}],
                  "nets": [{"backend": "tap", "ifname": "eth0"}, {"backend": "network", "network": "lan"},
                           {"backend": "user", "ports": [[2222, 22]]}],
                  "shares": [{"path": "/", "tag": "root"}]},
         "limits": {"memory_limit": 1 << 40, "cpu_quota": None}}
    arc = write_archive(tmp_path / "evil.pyvirt", m, [member("boot/kernel"), member("disks/disk0.raw", disk)])
    vm = daemon.client.import_(arc)
    spec = vm["spec"]
    assert spec["nets"] == [] and spec["ports"] == [] and spec["shares"] == []   # no host folder either
    assert vm["limits"]["memory_limit"] == (64 << 20) + (256 << 20)
    d = spec["disks"][0]
    assert d["format"] == "raw" and Path(d["path"]).is_relative_to(daemon.state)
    b = open_disk(d["path"], fmt=d["format"])            # as the runner opens it
    try:
        assert isinstance(b, RawFileBackend) and getattr(b, "backing", None) is None
        buf = bytearray(len(SECRET))
        b.readinto(0, memoryview(buf))
        assert bytes(buf) != SECRET and bytes(buf[:4]) == b"QFI\xfb"
    finally:
        b.close()

    # the importing user's choices are what counts
    vm = daemon.client.import_(arc, name="mine", nets=["user"], memory_limit="512M", cpu_quota=0.5)
    assert [n["backend"] for n in vm["spec"]["nets"]] == ["user"] and vm["spec"]["nets"][0]["ports"] == []
    assert vm["limits"]["memory_limit"] == 512 << 20 and vm["limits"]["cpu_quota"] == 0.5
    e = pytest.raises(ApiError, daemon.client.import_, arc, name="small", memory_limit="100M").value
    assert e.status == 422 and "too small" in e.detail, e.detail


@pytest.mark.parametrize("bad", ["imp\n", "imp\x00"])
def test_import_names_with_a_newline_or_nul_are_refused(daemon: Daemon, tmp_path: Path, bad: str) -> None:
    m = {"format": "pyvirt-export", "version": 1, "name": bad, "members": {"boot/kernel": 10},
         "spec": {"memory": 64 << 20, "kernel": "boot/kernel"}}
    arc = write_archive(tmp_path / "n.pyvirt", m, [member("boot/kernel")])
    e = pytest.raises(ApiError, daemon.client.import_, arc).value
    assert e.status == 422, e.detail
    assert daemon.client.list() == []


def test_a_nul_in_a_member_name_is_a_422(daemon: Daemon, tmp_path: Path) -> None:
    name = "boot/" + "k" * 120 + "\x00x"       # (long: tarfile writes it in a PAX header, NUL and all)
    m = {"format": "pyvirt-export", "version": 1, "name": "imp", "members": {name: 10},
         "spec": {"memory": 64 << 20, "kernel": name}}
    arc = write_archive(tmp_path / "n.pyvirt", m, [member(name)])
    e = pytest.raises(ApiError, daemon.client.import_, arc).value
    assert e.status == 422 and "unsafe" in e.detail, e.detail


def fake_unpacked(tmp_path: Path, nets: list, ports: list) -> Path:
    """An unpacked archive with a (portable) snapshot whose spec plugs its NIC and its
    console port into host sockets."""
    u = tmp_path / "unpacked"
    (u / "snapshot").mkdir(parents=True)
    (u / "disks").mkdir()
    (u / "boot").mkdir()
    (u / "boot" / "kernel").write_bytes(b"k" * 10)
    (u / "disks" / "disk0.raw").write_bytes(bytes(65536))
    mem = 16 << 20
    state = b"{}"
    (u / "snapshot" / "state.json").write_bytes(state)
    with open(u / "snapshot" / "ram", "wb") as f:
        f.truncate(fmt.ram_file_size(mem))
    spec = {"memory": mem, "kernel": "boot/kernel", "nets": nets, "ports": ports,
            "disks": [{"path": "disks/disk0.raw", "format": "auto"}]}
    m = {"format": fmt.FORMAT, "version": fmt.VERSION, "memory": mem, "spec": spec,
         "disks": [{"kind": "frozen", "path": "disks/disk0.raw", "format": "raw", "size": 65536}],
         "files": {"state.json": {"size": len(state), "sha256": hashlib.sha256(state).hexdigest()},
                   "ram": {"size": fmt.ram_file_size(mem)}}}
    (u / "snapshot" / "manifest.json").write_text(json.dumps(m))
    return u


def test_an_archived_snapshot_cannot_plug_into_host_sockets(tmp_path: Path) -> None:
    evil_nets = [{"backend": "stream", "socket": "/run/dbus/system_bus_socket", "mac": "52:54:00:12:34:56"}]
    evil_ports = [{"name": "org.pyvirt.agent", "socket": "/run/dbus/system_bus_socket"},
                  {"name": "p1", "socket": "/tmp/elsewhere.sock"}]
    u = fake_unpacked(tmp_path, evil_nets, evil_ports)
    with pytest.raises(archive.ArchiveError, match="1 network interface"):
        archive.install_snapshot(u, tmp_path / "s1", [])      # the archive's NIC is not used
    assert not (tmp_path / "s1").exists()
    u = fake_unpacked(tmp_path / "again", evil_nets, evil_ports)
    m = archive.install_snapshot(u, tmp_path / "s2", [{"backend": "user"}])
    spec = m["spec"]
    assert [(n["backend"], n.get("socket"), n["mac"]) for n in spec["nets"]] == [("user", None, "52:54:00:12:34:56")]
    assert [p["name"] for p in spec["ports"]] == ["org.pyvirt.agent", "p1"]
    assert all(Path(p["socket"]).parent == tmp_path / "s2" for p in spec["ports"])
    assert all(d["format"] == "raw" for d in spec["disks"])
    on_disk = json.loads((tmp_path / "s2" / "manifest.json").read_text())["spec"]
    assert on_disk == spec and "/run/dbus" not in json.dumps(on_disk)
    assert os.stat(tmp_path / "s2" / "disk0.raw").st_mode & 0o222 == 0


def _tar_header(name: str, size: int, kind: bytes) -> bytes:
    import tarfile
    ti = tarfile.TarInfo(name)
    ti.size, ti.type = size, kind
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


def _zst(path: Path, parts) -> Path:   # noqa: ANN001 -- an iterable of bytes, compressed as a stream
    import zstandard
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as z:
        for p in parts:
            z.write(p)
    return path


def test_a_huge_pax_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    """tarfile reads a PAX header of any size into memory (a 32 KB archive took the daemon
    to 3.2 GB): the archive's tar reader refuses one over 64 KiB before reading it."""
    import resource
    import tarfile
    size = 512 << 20

    def parts():   # noqa: ANN202
        yield _tar_header("././@PaxHeader", size, tarfile.XHDTYPE)
        chunk = b"9" * (1 << 20)
        for _ in range(size >> 20):
            yield chunk
    arc = _zst(tmp_path / "bomb.pyvirt", parts())
    assert arc.stat().st_size < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.monotonic()
    with pytest.raises(archive.ArchiveError, match="PAX header"):
        archive.unpack(arc, tmp_path / "dest")
    assert time.monotonic() - t < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10     # KiB: < 100 MiB
    assert not (tmp_path / "dest").exists()


def test_endless_tar_headers_are_refused(tmp_path: Path) -> None:
    import tarfile
    g = _tar_header("././@PaxHeader", 16, tarfile.XHDTYPE[:0] + b"g") + b"11 comment=\n".ljust(512, b"\0")
    arc = _zst(tmp_path / "many.pyvirt", [g] * 20000)
    with pytest.raises(archive.ArchiveError, match="tar headers"):
        archive.unpack(arc, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_imported_files_are_durable_before_they_are_recorded(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every unpacked member and the directories naming them are fsynced by unpack(), before
    the daemon records the VM (a crash right after the import must not lose its disks)."""
    synced: set[str] = set()
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    m = {"format": "pyvirt-export", "version": 1, "name": "imp",
         "members": {"boot/kernel": 10, "disks/disk0.raw": 4096},
         "spec": {"memory": 64 << 20, "kernel": "boot/kernel", "disks": [{"path": "disks/disk0.raw"}]}}
    arc = write_archive(tmp_path / "a.pyvirt", m, [member("boot/kernel"), member("disks/disk0.raw", b"d" * 4096)])
    dest = tmp_path / "dest"
    archive.unpack(arc, dest)
    want = {dest / "boot" / "kernel", dest / "disks" / "disk0.raw", dest, dest / "boot", dest / "disks"}
    assert {str(p) for p in want} <= synced, synced
