"""Manager races and edges (issue 14): `delete --force` racing `start` (the start is refused
while the delete ends the runner, so no VM runs on without a record); a guest that finishes
before its runner's control socket is seen has started."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirt.host import manager as mgr
from pyvirt.host import supervisor
from pyvirt.host.models import VmCreate
from pyvirt.host.paths import proc_start_time
from pyvirt.testing.archives import member, write_archive


def test_start_during_a_forced_delete_is_refused(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvirt.images import cached_default_image
    if cached_default_image() is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    m = mgr.Manager(state_dir)
    pids = []
    try:
        m.create(VmCreate(name="v", memory="64M", command="sleep 1000"))
        pids.append(m.start("v")["pid"])
        real = m._force_end
        refused = []

        def force_end_then_start(rec, why="killed"):   # noqa: ANN001, ANN202 -- the race, made certain
            real(rec, why)
            try:
                out = m.start("v")
                pids.append(out["pid"])
            except mgr.Conflict as e:
                refused.append(str(e))
        monkeypatch.setattr(m, "_force_end", force_end_then_start)
        m.delete("v", force=True)
        assert refused and "being deleted" in refused[0]
        assert m.store.all() == []
    finally:
        for pid in pids:
            if pid and proc_start_time(pid) is not None:
                import os
                import signal
                os.killpg(pid, signal.SIGKILL)
        m.close()
    assert len(pids) == 1


def test_a_guest_that_finishes_at_once_has_started(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner whose guest powered off before its control socket was seen: start reports
    the VM started and now stopped, not a failure to start (issue 14)."""
    import subprocess
    import sys

    from pyvirt.host.paths import vm_paths
    from pyvirt.images import cached_default_image
    if cached_default_image() is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    real = subprocess.Popen

    def popen(args, **kw):   # noqa: ANN001, ANN003, ANN202 -- a runner whose guest is done at once
        if args[1:3] == ["-m", "pyvirt.host.runner"]:
            exit_file = vm_paths(Path(args[6]), args[4]).exit_file
            args = [sys.executable, "-c", "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text("
                    "'{\"reason\": \"poweroff\", \"exit_status\": 0}')", str(exit_file)]
        return real(args, **kw)
    monkeypatch.setattr(supervisor.subprocess, "Popen", popen)   # (supervisor.py spawns runners)
    m = mgr.Manager(state_dir)
    try:
        m.create(VmCreate(name="quick", memory="64M", command="true"))
        out = m.start("quick")
        assert out["state"] == "stopped" and out["reason"] == "poweroff" and out["exit_status"] == 0
    finally:
        m.close()


def test_an_import_cut_short_by_a_daemon_crash_leaves_nothing(state_dir: Path, tmp_path: Path) -> None:
    """The directories an import was filling when the daemon died are removed when a daemon
    starts on the state directory again; directories it does not know as unfinished stay."""
    from pyvirt.host import archive
    m = mgr.Manager(state_dir)
    m.close()
    arc = tmp_path / "a.pyvirt"
    write_archive(arc, {"format": "pyvirt-export", "version": 1, "name": "imp", "members": {"boot/kernel": 10},
                        "spec": {"memory": 64 << 20, "kernel": "boot/kernel"}}, [member("boot/kernel")])
    half = state_dir / "vms" / "0123456789ab"
    archive.unpack(arc, half)                          # (the daemon died before recording it)
    keep = state_dir / "vms" / "other"
    keep.mkdir()
    m = mgr.Manager(state_dir)
    m.close()
    assert not half.exists() and keep.exists()
