"""A pyvirtd VM on the user's own disks (raw and qcow2) through a snapshot, `stop` and `rm`:
every byte the VM wrote is in the user's files (issue 18, item 1)."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from pyvirt.backends.disk import open_disk
from pyvirt.backends.qcow2_tools import create_qcow2
from pyvirt.testing.daemon import Daemon, wait_for

MIB = 1 << 20
# Every 0.3 s: "N=<i>" written (and flushed) to both disks, then "W=<i>" on the console.
WRITER = ("i=0; while true; do i=$((i+1)); for d in /dev/vda /dev/vdb; do "
          "printf 'N=%-6d' $i | dd of=$d conv=notrunc,fsync 2>/dev/null; done; echo W=$i; sleep 0.3; done")


def written(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"W=(\d+)", text)]


def head(path: Path) -> int:
    buf = bytearray(8)
    with contextlib.closing(open_disk(path, read_only=True)) as b:
        b.readinto(0, memoryview(buf))
    return int(bytes(buf)[2:].decode().strip() or 0)


def test_snapshot_stop_and_rm_keep_every_byte_in_the_users_disks(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    raw, qcow2 = tmp_path / "mine.raw", tmp_path / "mine.qcow2"
    raw.write_bytes(bytes(MIB))
    create_qcow2(qcow2, MIB)
    c.create("w", memory="64M", command=WRITER, disks=[str(raw), str(qcow2)])
    c.start("w")
    wait_for(lambda: len(written(c.logs("w")["text"])) >= 2, 60, "the guest's first writes")
    snap = c.snapshot("w", "s")
    at_snapshot = max(written(c.logs("w")["text"]))
    wait_for(lambda: max(written(c.logs("w")["text"])) > at_snapshot + 3, 30, "writes after the snapshot")
    assert [d["path"] for d in c.inspect("w")["spec"]["disks"]] == [str(raw), str(qcow2)]
    c.stop("w")
    last = max(written(c.logs("w")["text"]))
    out = daemon.cli("rm", "w")
    assert out.returncode == 0, out
    for disk in (raw, qcow2):
        assert last <= head(disk) <= last + 1, (disk, last)    # the VM's last write is the user's
        assert disk.stat().st_mode & 0o200                     # and the file stays theirs
    # The snapshot has copies of its own, as of the snapshot, checked on restore.
    m = json.loads((Path(snap["dir"]) / "manifest.json").read_text())
    assert [d["copied_from"] for d in m["disks"]] == [str(raw), str(qcow2)]
    for i in (0, 1):
        assert head(Path(snap["dir"]) / f"disk{i}.qcow2") < at_snapshot + 3
