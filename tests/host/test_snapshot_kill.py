"""A snapshot cut short at each of its steps (issue 14): the runner or the daemon is killed
(SIGKILL) at one step of a pyvirtd snapshot, and afterwards the daemon is consistent (the VM
runs or is startable as its state says, every recorded snapshot is whole and nothing
unrecorded is left in snapshots/), the VM writes where the daemon's database says, the
images the database names pass `qemu-img check`, and the next boot finds every write the
guest flushed -- before the kill, and after it where the VM went on running.

The steps of a snapshot of a running VM, in order (host/snapshots.py, host/runner.py,
vmm/snapshot.py); those marked * are where the test stops:

  daemon  the snapshot directory made; the guest's file systems frozen by its agent *frozen
  runner  at a slice boundary (the guest does not run): clock paused, device state taken
  runner  each writable disk flushed and closed *flushed
  runner  the snapshot's overlay and the VM's new live overlay made, the VM switched to it *switched
  runner  disks.json written and fsynced *disks-json; the old images made read-only
  runner  state.json written and fsynced; the RAM written *ram (before it)
  runner  the manifest written, fsynced, renamed into place *saved; disks.json again; the reply
  daemon  the reply in hand *replied; the VM's new disks recorded (sync_disks); the guest thawed
  daemon  the manifest read, the snapshot recorded *recorded; the answer

One VM goes through all the cases (each case ends with the boot that checks it, which is
the next case's VM): one guest boot a case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirt.host.client import ApiError
from pyvirt.testing.daemon import Daemon, start_disk_vm, wait_for

# In the daemon and its runners: at STEP, if the control file names it ("STEP kill" or "STEP
# wait"), SIGKILL to itself, or an at-STEP file and a wait for go-STEP (the test kills the
# other process meanwhile; a jailed runner may not signal the daemon).  The daemon's control
# files are in this hook directory, a runner's in its VM directory (all its jail lets it see).
HOOK = r"""
import contextlib, os, signal, sys, time
_HOOKDIR = os.path.dirname(os.path.abspath(__file__))

def _stop(step, where):
    if not where:
        return
    ctl = os.path.join(where, "stop-at")
    try:
        with open(ctl) as f:
            want, action = f.read().split()
    except (OSError, ValueError):
        return
    if want != step:
        return
    os.unlink(ctl)                              # (once)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    open(os.path.join(where, "at-" + step), "w").close()
    end = time.monotonic() + 120
    while not os.path.exists(os.path.join(where, "go-" + step)) and time.monotonic() < end:
        time.sleep(0.05)

# -- the runner: vmm/snapshot.py's save_snapshot and what it calls
import pyvirt.vmm.snapshot as _s
import pyvirt.backends.qcow2_tools as _q
_save = {"dir": None, "qcow2": 0, "disks": 0}
_real_save = _s.save_snapshot
def _saving(vm, directory, **k):
    _save.update(dir=str(k["own_dir"]) if k.get("own_dir") else None, qcow2=0, disks=0)
    main = sys.modules.get("__main__")
    if getattr(main, "write_disks", None) is not None and not hasattr(main.write_disks, "hooked"):
        real_write = main.write_disks
        def write_disks(paths, vm):
            first = _save["disks"] == 0
            _save["disks"] += 1
            if first:
                _stop("switched", _save["dir"])
            real_write(paths, vm)
            if first:
                _stop("disks-json", _save["dir"])
        write_disks.hooked = True
        main.write_disks = write_disks
    out = _real_save(vm, directory, **k)
    _stop("saved", _save["dir"])
    _save["dir"] = None
    return out
_s.save_snapshot = _saving
_real_create = _q.create_qcow2
def _create(*a, **k):
    if _save["qcow2"] == 0:
        _stop("flushed", _save["dir"])
    _save["qcow2"] += 1
    return _real_create(*a, **k)
_q.create_qcow2 = _create
_real_ram = _s._write_ram
def _ram(*a, **k):
    _stop("ram", _save["dir"])
    return _real_ram(*a, **k)
_s._write_ram = _ram

# -- the daemon: host/snapshots.py's take_snapshot
import pyvirt.host.control as _c
import pyvirt.host.snapshots as _hs
import pyvirt.host.store as _st
import pyvirt.host.supervisor as _sup
_real_frozen = _hs.frozen_filesystems
@contextlib.contextmanager
def _frozen(agent):
    with _real_frozen(agent) as f:
        _stop("frozen", _HOOKDIR)
        yield f
_hs.frozen_filesystems = _frozen
_real_call = _sup.Supervisor.call
def _call(self, rec, req, reply, *a, **k):
    out = _real_call(self, rec, req, reply, *a, **k)
    if isinstance(req, _c.Snapshot):
        _stop("replied", _HOOKDIR)
    return out
_sup.Supervisor.call = _call
_real_add = _st.SnapshotStore.add
def _add(self, rec):
    _real_add(self, rec)
    _stop("recorded", _HOOKDIR)
_st.SnapshotStore.add = _add
"""

# Every boot: FOUND and the marks on the disk (sector i holds "Mi"), then marks from the next
# one on, each flushed before its WROTE line (fsync on /dev/vda: written and a virtio FLUSH).
GUEST = ("n=$(dd if=/dev/vda bs=512 skip=1 count=1500 2>/dev/null | tr -d '\\000' | grep -c M); "
         "echo FOUND $(dd if=/dev/vda bs=512 skip=1 count=1500 2>/dev/null | tr -d '\\000' | tr '\\n' ' ') END; "
         "i=$((n+1)); while true; do printf 'M%d\\n' $i | dd of=/dev/vda bs=512 seek=$i "
         "conv=notrunc,fsync 2>/dev/null; sync; echo WROTE $i; i=$((i+1)); sleep 1; done")

DAEMON_STEPS = ("frozen", "replied", "recorded")
STEPS = ["frozen", "flushed", "switched", "disks-json", "ram", "saved", "replied", "recorded"]


class Bench:
    """One daemon (with HOOK) and VM "v" running GUEST, through all the cases."""

    def __init__(self, state: Path, tmp: Path) -> None:
        self.state = state
        self.hook = state / "hook"
        self.hook.mkdir()
        (self.hook / "sitecustomize.py").write_text(HOOK)
        path = os.pathsep.join(p for p in (str(self.hook), os.environ.get("PYTHONPATH", "")) if p)
        self.d = Daemon(state, env={"PYTHONPATH": path})
        self.c = self.d.client
        self.wrote: set[int] = set()        # every mark a WROTE line reported (flushed)
        self.seen = 0                       # the console log read up to here
        _, vm = start_disk_vm(self.d, tmp, GUEST)
        self.vm_dir = state / "vms" / vm["id"]
        self.found()
        self.take_log()

    def log(self) -> str:
        chunk = self.c.logs("v", offset=self.seen)
        return str(chunk["text"])

    def found(self) -> set[int]:
        """The marks the boot under way finds (its FOUND line, once a write follows it)."""
        text = wait_for(lambda: re.search(r"FOUND(.*?)END.*?WROTE \d+", (t := self.log()), re.S) and t, 120,
                        "the boot's FOUND line and a write after it")
        return {int(m) for m in re.findall(r"M(\d+)", re.search(r"FOUND(.*?)END", text, re.S).group(1))}

    def take_log(self) -> None:
        chunk = self.c.logs("v", offset=self.seen)
        text = str(chunk["text"])
        text = text[:text.rfind("\n") + 1]          # (whole lines: the rest is read next time)
        self.seen = int(chunk["start"]) + len(text.encode())
        text = re.split(r"FOUND.*?END", text, maxsplit=1, flags=re.S)[-1]    # (what follows a boot's FOUND line)
        self.wrote |= {int(n) for n in re.findall(r"WROTE (\d+)\r?\n", text)}

    def writes_after(self, count: int) -> None:
        """Until the guest reports `count` more flushed writes."""
        base = len(self.wrote)
        wait_for(lambda: (self.take_log(), len(self.wrote) >= base + count)[1], 60, "the guest's writes")

    def boot_and_check(self) -> None:
        """Start v again; its boot finds every flushed mark."""
        self.take_log()
        self.c.start("v")
        found = self.found()
        lost = sorted(self.wrote - found)
        assert not lost, f"flushed writes lost: {lost} (found {sorted(found)})"
        self.take_log()                     # (this boot's writes from now on)

    def close(self) -> None:
        self.d.cleanup()


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    state = Path(tempfile.mkdtemp(prefix="pvd-", dir="/tmp"))     # short: socket paths hold 107 bytes
    tmp = Path(tempfile.mkdtemp(prefix="pvk-"))
    b = None
    try:
        b = Bench(state, tmp)
        yield b
    finally:
        if b is not None:
            b.close()
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def qemu_img_chain_clean(top: Path) -> None:
    """`qemu-img check` passes on every qcow2 image of `top`'s backing chain (all open)."""
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(top)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for image in json.loads(out.stdout):
        if image["format"] == "qcow2":
            chk = subprocess.run(["qemu-img", "check", "-U", "-f", "qcow2", image["filename"]],
                                 capture_output=True, text=True, timeout=60)
            assert chk.returncode == 0, chk.stdout + chk.stderr


def snapshots_consistent(b: Bench) -> bool:
    """Every recorded snapshot is whole, and every directory in snapshots/ is recorded."""
    from pyvirt.vmm.snapshot import read_manifest
    recorded = {s["name"] for s in b.c.snapshots()}
    on_disk = {p.name for p in (b.state / "snapshots").iterdir()} if (b.state / "snapshots").is_dir() else set()
    for name in recorded:
        read_manifest(b.state / "snapshots" / name)        # (raises if it is not whole)
    return recorded == on_disk


@pytest.mark.parametrize("victim", ["daemon", "runner"])
@pytest.mark.parametrize("step", STEPS)
def test_a_snapshot_killed_at_any_step_loses_no_flushed_write(bench: Bench, step: str, victim: str) -> None:
    b, c = bench, bench.c
    name = f"s-{step}-{victim}"
    if c.inspect("v")["state"] != "running":          # (a case before this one failed)
        b.boot_and_check()
    b.writes_after(1)
    where = b.hook if step in DAEMON_STEPS else b.vm_dir
    in_victim = (victim == "daemon") == (step in DAEMON_STEPS)
    for left in (f"at-{step}", f"go-{step}"):          # an earlier case's (the daemon's for both
        (where / left).unlink(missing_ok=True)         # victims): a stale go-STEP lets it run on
    (where / "stop-at").write_text(f"{step} {'kill' if in_victim else 'wait'}")
    result: list[Any] = []

    def take() -> None:
        try:
            result.append(c.snapshot("v", name))
        except Exception as e:     # noqa: BLE001 -- ApiError, or the daemon dies under it
            result.append(e)
    runner_pid = c.inspect("v")["pid"]
    t = threading.Thread(target=take)
    t.start()
    if not in_victim:
        wait_for((where / f"at-{step}").exists, 60, f"the snapshot to reach {step}")
    if victim == "daemon":
        assert b.d.proc is not None
        if not in_victim:
            b.d.proc.kill()
        b.d.proc.wait(30)
        assert b.d.proc.returncode == -signal.SIGKILL
        b.d.proc = None
        t.join(60)
        b.d.start()                                   # recovers (the runner may still wait at the step)
    else:
        if not in_victim:
            os.kill(runner_pid, signal.SIGKILL)
    (where / f"go-{step}").touch()
    t.join(120)
    assert result and not t.is_alive()
    if victim == "runner":
        ok = isinstance(result[0], dict)
        # the runner's work was done before these steps: the snapshot stands; else it failed
        assert ok == (step in ("replied", "recorded")), result[0]
        if not ok:
            assert isinstance(result[0], ApiError) and result[0].status == 409, result[0]
        wait_for(lambda: c.inspect("v")["state"] == "crashed", 30, "the crash to be noticed")
    else:
        assert not isinstance(result[0], dict), result[0]     # (its connection went with the daemon)
        wait_for(lambda: c.inspect("v")["state"] == "running", 30, "the VM running on")
    # the VM writes (wrote) where the database says: disks.json is what the runner writes now
    disks = b.vm_dir / "disks.json"
    wait_for(lambda: not disks.exists() or
             json.loads(disks.read_text())[0]["path"] == c.inspect("v")["spec"]["disks"][0]["path"],
             30, "the database to name the disk the VM writes")
    if victim == "daemon":
        b.writes_after(2)                             # writes after the daemon came back
        c.kill("v")
    wait_for(lambda: snapshots_consistent(b), 30, "the snapshot recorded whole or not left at all")
    assert name in {s["name"] for s in c.snapshots()} or not (b.state / "snapshots" / name).exists()
    disk = Path(c.inspect("v")["spec"]["disks"][0]["path"])
    assert disk.is_file() and disk.resolve().is_relative_to(b.state.resolve())
    qemu_img_chain_clean(disk)
    b.boot_and_check()                                # also the next case's VM


def test_unrecorded_snapshot_directories_are_removed_when_nothing_writes_them(state_dir: Path) -> None:
    """What remove_orphans takes (no runner here): a whole unrecorded snapshot at once; an
    unfinished one at start, else once it is ORPHAN_AGE old; never one this daemon is taking,
    an import's (marked incomplete) nor a recorded one."""
    import time

    from pyvirt.host import manager as mgr
    from pyvirt.host.archive import INCOMPLETE
    from pyvirt.host.snapshots import ORPHAN_AGE
    from pyvirt.host.store import SnapshotRecord
    from pyvirt.vmm.snapfiles import MANIFEST

    m = mgr.Manager(state_dir, jail=False)
    try:
        top = state_dir / "snapshots"
        top.mkdir(mode=0o700, exist_ok=True)
        for n in ("whole", "old", "fresh", "importing", "taking", "recorded"):
            (top / n).mkdir()
        (top / "whole" / MANIFEST).write_text("{}")
        (top / "importing" / INCOMPLETE).touch()
        (top / "importing" / MANIFEST).write_text("{}")
        past = time.time() - ORPHAN_AGE - 5
        os.utime(top / "old", (past, past))
        m.snaps.taking.add("taking")
        m.snaps.snapshots.add(SnapshotRecord(name="recorded", vm="v", vm_id="x", dir=str(top / "recorded"),
                                             created=time.time(), memory=0, size=0, version=1, frozen="[]"))
        m.snaps.remove_orphans()
        assert sorted(p.name for p in top.iterdir()) == ["fresh", "importing", "recorded", "taking"]
        m.snaps.remove_orphans(at_start=True)
        assert sorted(p.name for p in top.iterdir()) == ["importing", "recorded", "taking"]
    finally:
        m.close()
