"""A snapshot cut short at each of its steps (issue 14): the daemon or the runner is killed
(SIGKILL) at one step of the runner's `save_snapshot`, and afterwards no write the guest had
flushed is lost and the VM writes where the daemon's database says -- a later boot finds every
flushed write, including one made after the daemon came back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.host.client import ApiError
from pyvirt.testing.daemon import Daemon, start_disk_vm, wait_for

# In the runners of the daemon started with it, at STEP of save_snapshot: for WHO "runner",
# SIGKILL to itself; for "daemon", an "at-step" file in the VM directory and a 5 s pause, in
# which the test kills the daemon (a jailed runner may not signal it).
HOOK = """
import os, signal, sys, time
_who, _, _step = os.environ.get("PYVIRT_TEST_KILL", "").partition(":")
if _step and "--id" in sys.argv:             # (a runner: python -m pyvirt.host.runner --id ID ...)
    import pyvirt.vmm.snapshot as _s
    def _kill():
        if _who == "runner":
            os.kill(os.getpid(), signal.SIGKILL)
        a = sys.argv
        vm_dir = os.path.join(a[a.index("--state-dir") + 1], "vms", a[a.index("--id") + 1])
        with open(os.path.join(vm_dir, "at-step"), "w") as f:
            f.write(_step)
        time.sleep(5)
    def _around(name, before):
        real = getattr(_s, name)
        def wrapped(*a, **k):
            if before:
                _kill()
            out = real(*a, **k)
            if not before:
                _kill()
            return out
        setattr(_s, name, wrapped)
    if _step == "moving":           # the VM is on its new overlays, disks.json not yet written
        _real_freeze = _s._freeze_disks
        def _freeze(vm, *a, **k):
            vm.disks_moved = [_kill, *vm.disks_moved]
            return _real_freeze(vm, *a, **k)
        _s._freeze_disks = _freeze
    elif _step == "frozen":         # disks.json written, old images read-only, no RAM yet
        _around("_freeze_disks", before=False)
    elif _step == "ram":            # state written, RAM not
        _around("_write_ram", before=True)
    elif _step == "manifest":       # RAM written, manifest not
        _around("_write_ram", before=False)
    elif _step == "reply":          # the snapshot is whole; the reply not sent
        _around("save_snapshot", before=False)
"""

W2 = "echo -n MARK2 | dd of=/dev/vda conv=notrunc 2>/dev/null; sync; echo WROTE2"
GUEST = ("h=$(dd if=/dev/vda bs=5 count=1 2>/dev/null); case \"$h\" in "
         "MARK2) echo FOUND2;; "
         f"MARK1) echo FOUND1; {W2};; "
         f"*) echo -n MARK1 | dd of=/dev/vda conv=notrunc 2>/dev/null; sync; echo READY; sleep 6; {W2};; "
         "esac; sleep 1000")
STEPS = ["moving", "frozen", "ram", "manifest", "reply"]


@pytest.fixture
def hooked(state_dir: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    hook = state_dir / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    d = Daemon(state_dir, env={"PYTHONPATH": path, "PYVIRT_TEST_KILL": request.param})
    try:
        yield d
    finally:
        d.cleanup()


def _boot_again(d: Daemon, want: str) -> str:
    c = d.client
    if c.inspect("v")["state"] in ("running", "paused"):
        c.kill("v")
    before = len(c.logs("v", tail=1 << 20)["text"])
    c.start("v")
    text = wait_for(lambda: (t := c.logs("v", tail=1 << 20)["text"][before:]) and
                    any(w in t for w in ("FOUND1", "FOUND2", "READY")) and t, 90, "the next boot")
    assert want in text, text[-600:]
    return text


@pytest.mark.parametrize("hooked", [f"runner:{s}" for s in STEPS] + [f"daemon:{s}" for s in STEPS],
                         indirect=True)
def test_a_snapshot_killed_at_any_step_loses_no_flushed_write(hooked: Daemon, tmp_path: Path) -> None:
    d = hooked
    c = d.client
    who = d.env["PYVIRT_TEST_KILL"].partition(":")[0]
    start_disk_vm(d, tmp_path, GUEST)
    wait_for(lambda: "READY" in c.logs("v")["text"], 90, "MARK1 written and flushed")
    if who == "runner":
        with pytest.raises(ApiError):
            c.snapshot("v", "s1")                 # the runner dies under it
        wait_for(lambda: c.inspect("v")["state"] == "crashed", 30, "the VM crashed")
        assert c.snapshots() == []                # nothing half-made is recorded
        _boot_again(d, "FOUND1")                  # MARK1 survived; this boot writes MARK2
        wait_for(lambda: "WROTE2" in c.logs("v", tail=1 << 20)["text"].split("FOUND1")[-1], 60, "MARK2")
    else:
        import threading

        def take() -> None:
            try:
                c.snapshot("v", "s1")
            except Exception:     # noqa: BLE001 -- the daemon dies under it
                pass
        t = threading.Thread(target=take)
        t.start()
        wait_for(lambda: list(d.state.glob("vms/*/at-step")), 60, "the runner at the step")
        assert d.proc is not None
        d.proc.kill()                             # SIGKILL, while the runner waits at the step
        d.proc.wait(10)
        d.proc = None
        t.join(30)
        d.start()                                 # recovers: the runner went on
        assert c.inspect("v")["state"] == "running"
        wait_for(lambda: "WROTE2" in c.logs("v", tail=1 << 20)["text"], 60, "MARK2 after the snapshot")
    spec_disk = Path(c.inspect("v")["spec"]["disks"][0]["path"])
    assert spec_disk.is_file() and spec_disk.is_relative_to(d.state)
    _boot_again(d, "FOUND2")                      # the last flushed write is where the record says
