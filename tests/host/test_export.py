"""Export and import through pyvirtd: a stopped VM's disks (a qcow2 overlay flattened with
its backing file) travel in one archive and boot again under a new name; bad archives are
refused with one line and leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from pyvirt.backends.qcow2_tools import create_qcow2
from pyvirt.host.client import ApiError
from pyvirt.testing.archives import member, write_archive
from pyvirt.testing.daemon import COUNTER, Daemon, counts, wait_for

GUEST = ("if dd if=/dev/vda bs=5 count=1 2>/dev/null | grep -q DATA1; then echo FOUND "
         "$(dd if=/dev/vda bs=4 skip=1024 count=1 2>/dev/null); "
         "else echo -n DATA1 | dd of=/dev/vda conv=notrunc 2>/dev/null && sync && echo WROTE; fi")


def run_once(c, name: str) -> str:   # noqa: ANN001
    c.start(name)
    wait_for(lambda: c.inspect(name)["state"] == "stopped", 90, f"{name} to power off")
    return c.logs(name)["text"]


def vm_dirs(daemon: Daemon) -> set[str]:
    return {p.name for p in (daemon.state / "vms").iterdir()}


def test_export_then_import_boots_with_the_guests_data(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(4096) + b"BASE" + bytes((8 << 20) - 4100))
    top = tmp_path / "top.qcow2"
    create_qcow2(top, None, backing=base, backing_format="raw")
    c.create("orig", memory="64M", disks=[f"{top},iops=1000"], command=GUEST)
    assert "WROTE" in run_once(c, "orig")
    out = tmp_path / "orig.pyvirt"
    res = c.export("orig", out)
    boot = res["members"]["boot/kernel"] + res["members"]["boot/initrd"]
    assert res["members"]["disks/disk0.raw"] == 8 << 20 and out.stat().st_size < boot + (256 << 10)
    e = pytest.raises(ApiError, c.export, "orig", out).value      # never overwrites
    assert e.status == 409 and "exists" in e.detail
    vm = c.import_(out, name="copy")
    assert vm["state"] == "stopped" and vm["spec"]["disks"][0]["iops"] == 1000
    assert Path(vm["spec"]["disks"][0]["path"]).is_relative_to(daemon.state)
    assert Path(vm["spec"]["kernel"]).is_relative_to(daemon.state)
    assert "FOUND BASE" in run_once(c, "copy")
    disk = Path(vm["spec"]["disks"][0]["path"])
    assert os.stat(disk).st_blocks * 512 <= 256 << 10              # zero runs came back as holes
    e = pytest.raises(ApiError, c.import_, out).value              # the name "orig" is taken
    assert e.status == 409
    r = daemon.cli("import", str(out), "--name", "third")
    assert r.returncode == 0 and r.stdout.startswith("third "), r.stderr


def test_running_vm_is_not_exported(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    c.create("busy", memory="64M", command="sleep 1000")
    c.start("busy")
    e = pytest.raises(ApiError, c.export, "busy", tmp_path / "x.pyvirt").value
    assert e.status == 409 and "stop it" in e.detail
    assert not (tmp_path / "x.pyvirt").exists()
    e = pytest.raises(ApiError, c.export, "busy", tmp_path / "x.pyvirt", snapshot="nope").value
    assert e.status == 404


def good_manifest(**over) -> dict:   # noqa: ANN003
    m = {"format": "pyvirt-export", "version": 1, "name": "imp", "members": {"boot/kernel": 10},
         "spec": {"memory": 64 << 20, "kernel": "boot/kernel"}, "limits": {"memory_limit": 320 << 20}}
    return {**m, **over}


@pytest.mark.parametrize("manifest, members, cut, words", [
    (good_manifest(version=2), [member("boot/kernel")], None, "version 2 is not supported"),
    (good_manifest(format="tar"), [member("boot/kernel")], None, "not a pyvirt export archive"),
    (b"{not json", [], None, "not valid JSON"),
    (good_manifest(members={"../evil": 10}), [member("../evil")], None, "unsafe"),
    (good_manifest(members={"/etc/x": 10}), [member("/etc/x")], None, "unsafe"),
    (good_manifest(), [member("boot/../../evil")], None, "unsafe"),
    (good_manifest(), [member("boot/kernel", kind=tarfile.SYMTYPE)], None, "not a regular file"),
    (good_manifest(), [member("boot/kernel", kind=tarfile.CHRTYPE)], None, "not a regular file"),
    (good_manifest(), [member("boot/kernel", b"y" * 11)], None, "not the size"),
    (good_manifest(), [], None, "truncated"),
    (good_manifest(), [member("boot/kernel", os.urandom(300_000))], 2000, "truncated"),
])
def test_bad_archives_are_refused_and_leave_nothing(daemon: Daemon, tmp_path: Path, manifest, members,
                                                    cut, words: str) -> None:   # noqa: ANN001
    if cut and manifest == good_manifest():
        manifest = good_manifest(members={"boot/kernel": 300_000})
    bad = write_archive(tmp_path / "bad.pyvirt", manifest, members, cut)
    before = vm_dirs(daemon)
    e = pytest.raises(ApiError, daemon.client.import_, bad).value
    assert e.status == 422 and words in e.detail, e.detail
    assert daemon.client.list() == [] and vm_dirs(daemon) == before
    # where a member escaping the new VM directory would land: "../evil" and "boot/../../evil"
    # next to it in vms/, "/etc/x" where it says
    vms = daemon.state / "vms"
    assert not (vms / "evil").exists() and not (daemon.state / "evil").exists() and not Path("/etc/x").exists()


def test_garbage_file_and_missing_file(daemon: Daemon, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pyvirt"
    junk.write_bytes(os.urandom(5000))
    fifo = tmp_path / "fifo.pyvirt"                     # (its open waited for a writer, forever)
    os.mkfifo(fifo)
    for path, words in ((junk, "not a valid archive"), (tmp_path / "none.pyvirt", "cannot open"),
                        (fifo, "not a regular file")):
        e = pytest.raises(ApiError, daemon.client.import_, path).value
        assert e.status == 422 and words in e.detail, e.detail
    assert daemon.client.list() == [] and vm_dirs(daemon) == set()


def test_archive_paths_must_be_absolute(daemon: Daemon, tmp_path: Path) -> None:
    """A relative path would be resolved against the daemon's working directory: refused (422)."""
    daemon.client.create("rel", memory="64M")
    c = daemon.client                   # (Client makes paths absolute: the raw API is called here)
    for url, body in (("/vms/rel/export", {"path": "out.pyvirt"}), ("/vms/import", {"path": "in.pyvirt"})):
        e = pytest.raises(ApiError, c._call, "POST", url, json=body).value
        assert e.status == 422 and "must be absolute" in e.detail
    assert not Path("out.pyvirt").exists()


# -- with a snapshot ------------------------------------------------------------------------
DISK_THEN_COUNTER = "echo -n SNAPDISK | dd of=/dev/vda conv=notrunc 2>/dev/null; sync; " + COUNTER


@pytest.fixture
def other_daemon() -> Iterator[Daemon]:
    """A second pyvirtd on a state directory of its own (the importing host)."""
    d = Path(tempfile.mkdtemp(prefix="pvd2-", dir="/tmp"))
    daemon = Daemon(d)
    try:
        yield daemon
    finally:
        daemon.cleanup()
        shutil.rmtree(d, ignore_errors=True)


def snapshotted(c, tmp_path: Path) -> tuple[int, Path]:   # noqa: ANN001
    """VM "orig" (a qcow2 disk over a raw base) counting; paused and snapshotted as "s1".
    Returns the last count before the snapshot and the archive exported with it."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(4 << 20))
    top = tmp_path / "top.qcow2"
    create_qcow2(top, None, backing=base, backing_format="raw")
    c.create("orig", memory="64M", disks=[str(top)], command=DISK_THEN_COUNTER)
    c.start("orig")
    wait_for(lambda: "C=3 before" in c.logs("orig")["text"], 60, "the counter")
    c.pause("orig")
    c.snapshot("orig", "s1")
    last = max(counts(c.logs("orig")["text"]))
    out = tmp_path / "orig.pyvirt"
    res = c.export("orig", out, snapshot="s1")
    assert res["snapshot"] == "s1" and {"snapshot/manifest.json", "snapshot/state.json",
                                        "snapshot/ram"} <= set(res["members"])
    assert res["members"]["snapshot/ram"] == (64 << 20) + 4096
    return last, out


def test_export_with_snapshot_then_restore_on_another_daemon(daemon: Daemon, other_daemon: Daemon,
                                                             tmp_path: Path) -> None:
    c, c2 = daemon.client, other_daemon.client
    last, out = snapshotted(c, tmp_path)
    orig_snap = Path(c.snapshot_info("s1")["dir"])
    c.kill("orig")

    vm = c2.import_(out, name="moved")
    assert vm["state"] == "stopped" and vm["snapshot"] == "s1"
    info = c2.snapshot_info("s1")
    d = Path(info["dir"])
    assert d == other_daemon.state / "snapshots" / "s1" and info["vm"] == "moved" and info["used_by"] == []
    assert sorted(p.name for p in d.iterdir()) == ["boot-initrd", "boot-kernel", "disk0.qcow2", "disk0.raw",
                                                    "manifest.json", "ram", "state.json"]
    ram = d / "ram"                                     # byte-exact, and still sparse
    assert ram.read_bytes() == (orig_snap / "ram").read_bytes()
    assert ram.stat().st_blocks * 512 < ram.stat().st_size // 2
    assert (d / "disk0.raw").read_bytes()[:8] == b"SNAPDISK"   # the chain, flattened
    m = json.loads((d / "manifest.json").read_text())
    assert all(Path(x["path"]).is_relative_to(d) for x in m["disks"])   # self-contained
    assert not (other_daemon.state / "vms" / vm["id"] / "snapshot").exists()

    back = c2.restore("s1", name="back")
    assert back["state"] == "running"
    text = wait_for(lambda: (t := c2.logs("back")["text"]) and len(counts(t)) >= 3 and t, 60,
                    "the restored counter")
    first = counts(text)[0]
    assert last < first <= last + 2, (last, text[:200])   # no reset: it goes on
    assert f"C={first} before" in text                      # /tmp/f survived
    c2.delete("back", force=True)

    r = other_daemon.cli("export", "moved", str(tmp_path / "again.pyvirt"), "--snapshot", "s1")
    assert r.returncode == 0 and "with its snapshot s1" in r.stdout, r.stderr   # a snapshot of "moved"
    r = other_daemon.cli("import", str(tmp_path / "again.pyvirt"), "--name", "twice")
    assert r.returncode == 0 and r.stdout.split()[2:] == ["snapshot", "twice-s1"], r   # s1 was taken
    e = pytest.raises(ApiError, c2.import_, tmp_path / "again.pyvirt", name="twice").value
    assert e.status == 409
    c2.delete("twice")                                   # its snapshot is not in its directory
    assert [s["name"] for s in c2.snapshots()] == ["s1", "twice-s1"]


def test_export_of_another_vms_snapshot_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    c.create("a", memory="64M", command="while true; do sleep 1; done")
    c.create("b", memory="64M")
    c.start("a")
    c.snapshot("a", "sa")
    e = pytest.raises(ApiError, c.export, "b", tmp_path / "b.pyvirt", snapshot="sa").value
    assert e.status == 409 and "snapshot of VM a, not of b" in e.detail, e.detail
    e = pytest.raises(ApiError, c.export, "b", tmp_path / "b.pyvirt", snapshot="ghost").value
    assert e.status == 404
    assert not (tmp_path / "b.pyvirt").exists() and os.listdir(tmp_path) == []


def rewrite(src: Path, dst: Path, edit) -> Path:   # noqa: ANN001
    """`src` with the snapshot manifest changed by `edit` (its declared size updated)."""
    with src.open("rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as z, \
            tarfile.open(fileobj=z, mode="r|") as tar:
        items = [(ti, tar.extractfile(ti).read()) for ti in tar]
    head = json.loads(items[0][1])
    out = []
    for ti, data in items[1:]:
        if ti.name == "snapshot/manifest.json":
            data = json.dumps(edit(json.loads(data))).encode()
            ti.size = head["members"][ti.name] = len(data)
        out.append((ti, data))
    return write_archive(dst, head, out)


def test_archive_with_a_foreign_snapshot_version_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    c.create("v", memory="64M", command="while true; do sleep 1; done")
    c.start("v")
    c.snapshot("v", "s")
    good = c.export("v", tmp_path / "good.pyvirt", snapshot="s")
    c.delete("v", force=True)
    c.delete_snapshot("s")
    vms_before, snaps_before = vm_dirs(daemon), set(os.listdir(daemon.state / "snapshots"))
    bad = rewrite(Path(good["path"]), tmp_path / "bad.pyvirt", lambda m: {**m, "version": 999})
    e = pytest.raises(ApiError, c.import_, bad).value
    assert e.status == 422 and "version 999" in e.detail and "version 1" in e.detail, e.detail
    assert "\n" not in e.detail
    moved = rewrite(Path(good["path"]), tmp_path / "moved.pyvirt",
                    lambda m: {**m, "disks": [{**m["disks"][0], "path": "/etc/passwd"}]} if m["disks"] else
                    {**m, "files": {**m["files"], "../x": {"size": 1}}})
    e = pytest.raises(ApiError, c.import_, moved).value
    assert e.status == 422, e.detail
    forged = rewrite(Path(good["path"]), tmp_path / "forged.pyvirt",      # fails only once installed
                     lambda m: {**m, "files": {**m["files"], "state.json": {**m["files"]["state.json"],
                                                                           "sha256": "0" * 64}}})
    e = pytest.raises(ApiError, c.import_, forged).value
    assert e.status == 422 and "state.json does not match its sha256" in e.detail, e.detail
    assert c.list() == [] and c.snapshots() == [] and vm_dirs(daemon) == vms_before
    assert set(os.listdir(daemon.state / "snapshots")) == snaps_before
    vm = c.import_(Path(good["path"]))                 # the unedited archive imports
    assert vm["snapshot"] == "s"
