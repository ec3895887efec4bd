"""A pyvirtd VM with a shared folder is snapshotted, restored and cloned (docs/shares.md,
"Snapshots"): its guest agent unmounts the share for the snapshot (a busy share refuses it in
one line naming the share) and mounts it again; the restored VM and the clones each get a
fresh virtiofsd and see the share, with the host's files as they are now."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvirt.host.client import ApiError
from pyvirt.testing.daemon import Daemon, wait_agent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd needs root"),
    pytest.mark.skipif(not os.access("/usr/lib/qemu/virtiofsd", os.X_OK), reason="no virtiofsd"),
]


def sh(daemon: Daemon, vm: str, script: str) -> str:
    code, out, err = daemon.client.run(vm, ["sh", "-c", script])
    assert code == 0, (vm, script, out, err)
    return out.decode()


def mounted(daemon: Daemon, vm: str) -> list[str]:
    """The guest's virtiofs mounts, as `TAG DIR OPTIONS` lines."""
    return sh(daemon, vm, "awk '$3 == \"virtiofs\" {print $1, $2, $4}' /proc/mounts").splitlines()


def test_a_vm_with_a_share_is_snapshotted_restored_and_cloned(daemon: Daemon, tmp_path: Path) -> None:
    share, other = tmp_path / "share", tmp_path / "other"
    share.mkdir()
    other.mkdir()
    (share / "before").write_text("host file before the snapshot\n")
    (other / "ro_file").write_text("read-only\n")
    c = daemon.client
    c.create("src", memory="256M", command="sleep 100000", shares=[f"{share}:work", f"{other}:other,ro"])
    c.start("src")
    wait_agent(c, "src")
    both = mounted(daemon, "src")
    assert [line.split()[:2] for line in both] == [["work", "/mnt/work"], ["other", "/mnt/other"]]
    assert both[1].split()[2].startswith("ro,")
    sh(daemon, "src", "echo from the guest > /mnt/work/guest_before")
    assert (share / "guest_before").read_text() == "from the guest\n"

    # A file open in the guest keeps the share busy: the snapshot is refused, naming it,
    # and both shares stay mounted (the other one, unmounted first, is mounted again).
    busy = c.exec("src", ["sh", "-c", "exec 3< /mnt/work/before; echo open; sleep 600"])
    events = busy.events()
    assert next(events).data == b"open\n"
    with pytest.raises(ApiError) as refused:
        c.snapshot("src", "gold")
    msg = str(refused.value)
    assert "share work is busy" in msg and "/mnt/work" in msg and "\n" not in msg, msg
    assert [s["name"] for s in c.snapshots()] == []
    assert sorted(mounted(daemon, "src")) == sorted(both)
    busy.kill(9)
    assert list(events)[-1].status == 128 + 9
    busy.close()

    c.snapshot("src", "gold")
    # The source goes on with its shares mounted again (the same options), read and written.
    assert sorted(mounted(daemon, "src")) == sorted(both)
    assert sh(daemon, "src", "cat /mnt/work/before") == "host file before the snapshot\n"
    sh(daemon, "src", "echo after > /mnt/work/src_after")
    assert (share / "src_after").read_text() == "after\n"
    (share / "host_after").write_text("host file after the snapshot\n")
    c.kill("src")

    # The restored VM and each clone: a fresh virtiofsd, the share mounted by the agent at
    # once, the host's files as they are now, writes reaching the host.
    back = c.restore("gold", name="back")["name"]
    names = [back, *(vm["name"] for vm in c.clone("gold", 2, prefix="cl"))]
    for name in names:
        assert sorted(mounted(daemon, name)) == sorted(both), name
        assert sh(daemon, name, "cat /mnt/other/ro_file; touch /mnt/other/x 2>/dev/null || echo refused") \
            == "read-only\nrefused\n"
        out = sh(daemon, name, "cd /mnt/work && cat before host_after && ls")
        assert out.splitlines()[:2] == ["host file before the snapshot", "host file after the snapshot"]
        assert {"before", "guest_before", "src_after", "host_after"} <= set(out.split())
        sh(daemon, name, f"echo {name} > /mnt/work/from_{name}; chmod 640 /mnt/work/from_{name}")
        assert (share / f"from_{name}").read_text() == f"{name}\n"
        assert (share / f"from_{name}").stat().st_mode & 0o777 == 0o640
    # ... and each of them can be snapshotted again.
    c.snapshot(names[1], "again")
    assert sh(daemon, names[1], "cat /mnt/work/from_back") == "back\n"
