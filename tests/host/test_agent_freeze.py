"""The guest agent freezes the guest's file systems around a pyvirtd snapshot (docs/agent.md,
request Q) and powers the guest off for `pyvirt stop`, on the default guest with an ext4 disk
made on the host."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pyvirt.backends.disk import open_disk
from pyvirt.host.agent import Agent, AgentConnection, AgentError, frozen_filesystems
from pyvirt.testing.daemon import Daemon, wait_agent, wait_for

MIB = 1 << 20

# Appends a numbered line to /mnt/d/log and keeps the count in /mnt/d/count, without end.
WRITER = "i=0; while :; do i=$((i+1)); echo $i >> /mnt/d/log; echo $i > /mnt/d/count; done"


def ext4_disk(path: Path) -> Path:
    if shutil.which("mkfs.ext4") is None or shutil.which("e2fsck") is None:
        pytest.skip("e2fsprogs (mkfs.ext4, e2fsck) is not installed")
    with open(path, "wb") as f:
        f.truncate(32 * MIB)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(path)], check=True, capture_output=True)
    return path


def count(c: object, name: str = "vm") -> int:
    """The writer's count (0 before it wrote one)."""
    code, out, err = c.run(name, ["sh", "-c", "cat /mnt/d/count 2>/dev/null || echo 0"])  # type: ignore[attr-defined]
    assert code == 0, err
    return int(out.strip() or b"0")


def fsck_snapshot_disk(snap_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`e2fsck -fn` on a raw copy of the snapshot's copy of the VM's (only) disk."""
    m = json.loads((snap_dir / "manifest.json").read_text())
    disk = m["disks"][0]
    d = open_disk(Path(disk["path"]), read_only=True, fmt=disk.get("format", "raw"))
    raw = tmp_path / f"{snap_dir.name}.raw"
    buf = bytearray(MIB)
    with open(raw, "wb") as f:
        for off in range(0, d.size, MIB):
            n = min(MIB, d.size - off)
            d.readinto(off, memoryview(buf)[:n])
            f.write(buf[:n])
    d.close()
    return subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True, timeout=120)


def test_snapshot_freezes_and_thaws_the_guest_file_systems(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    disk = ext4_disk(tmp_path / "data.ext4")
    c.create("vm", memory="256M", command="sleep 100000", disks=[str(disk)])
    c.start("vm")
    wait_agent(c, "vm")
    assert c.run("vm", ["sh", "-c", "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d"])[0] == 0
    writer = c.exec("vm", ["sh", "-c", WRITER])
    wait_for(lambda: count(c) > 10, 60, "the guest's writer")
    agent = Agent(Path(c.inspect("vm")["paths"]["dir"]) / "vsock.sock")

    # (1) frozen: the writer stops and a write started now completes only after the thaw
    # (the root is the initramfs: only the ext4 disk is block-backed)
    done = threading.Event()
    with frozen_filesystems(agent) as fr:
        assert fr.frozen == ["/mnt/d"], fr.describe()
        n = count(c)
        threading.Thread(target=lambda: (c.run("vm", ["sh", "-c", "echo x > /mnt/d/during"]), done.set()),
                         daemon=True).start()
        time.sleep(2)
        assert count(c) == n and not done.is_set()
    assert done.wait(30) and fr.thawed, fr.describe()
    wait_for(lambda: count(c) > n, 30, "the writer to go on after the thaw")

    # The agent thaws by itself when the host goes away, and after 30 s without its word.
    for host_leaves in (True, False):
        conn = AgentConnection(agent.path, timeout=60)
        conn.send("Q")
        assert conn.expect("T")[1] == b"/mnt/d\n"
        t0 = time.monotonic()
        n = count(c)
        time.sleep(1)
        assert count(c) == n
        if host_leaves:
            conn.close()
        else:
            with pytest.raises(AgentError, match="thawed without the host's word"):
                conn.expect("Z")
            conn.close()
        wait_for(lambda n=n: count(c) > n, 40, "the writer to go on")
        took = time.monotonic() - t0
        assert took < 10 if host_leaves else 28 < took < 45, took

    # (2) a daemon snapshot while the writer runs: its copy of the disk is clean
    snap = c.snapshot("vm", "s1")
    assert snap["guest_filesystems"] == "froze /mnt/d (thawed after the snapshot)", snap
    r = fsck_snapshot_disk(Path(snap["dir"]), tmp_path)
    assert r.returncode == 0 and "recover" not in r.stdout + r.stderr, r.stdout + r.stderr
    # (3) the guest keeps writing after it
    n = count(c)
    wait_for(lambda: count(c) > n + 10, 30, "the writer to go on after the snapshot")

    # Not frozen (the disk mounted through a device node outside /dev, which the agent does not
    # take for a block-backed mount): the copy needs its journal replayed -- what freezing saves.
    writer.close()                                      # (its shell gets SIGHUP)
    code, _, err = c.run("vm", ["sh", "-c", "while ! umount /mnt/d 2>/dev/null; do sleep 0.2; done; "
                                "mknod /tmp/vda b $(tr : ' ' < /sys/block/vda/dev) && mount -t ext4 /tmp/vda /mnt/d"])
    assert code == 0, err
    writer = c.exec("vm", ["sh", "-c", WRITER])
    wait_for(lambda: count(c) > n + 20, 30, "the writer again")
    snap2 = c.snapshot("vm", "s2")
    assert snap2["guest_filesystems"].startswith("not frozen: the guest has no writable block-backed"), snap2
    r = fsck_snapshot_disk(Path(snap2["dir"]), tmp_path)
    assert "recover" in r.stdout + r.stderr, r.stdout + r.stderr

    # A VM restored from the frozen snapshot: its agent thaws (the connection is reset) and it writes.
    c.restore("s1", "r1")
    assert c.run("r1", ["sh", "-c", "echo after > /mnt/d/after && cat /mnt/d/after"]) == (0, b"after\n", b"")
    c.kill("r1")
    writer.close()

    # (4) `pyvirt stop` through the vsock agent: the console-port agent is gone from the guest
    code, out, err = c.run("vm", ["sh", "-c", "for p in /proc/[0-9]*; do [ ${p#/proc/} = 1 ] && continue; "
                                  "ls -l $p/fd 2>/dev/null | grep -q vport && kill -9 ${p#/proc/}; done; "
                                  "rm -f /dev/virtio-ports/org.pyvirt.agent; true"])
    assert code == 0, err
    wait_for(lambda: c.inspect("vm")["runner"]["agent"] is False, 20, "the console-port agent to close")
    v = c.stop("vm", timeout=30)
    assert (v["state"], v["reason"]) == ("stopped", "poweroff"), v
    assert v["exit_status"] == 0, v
    assert "powering off through the guest agent" in (daemon.state / "test-daemon.log").read_text()
