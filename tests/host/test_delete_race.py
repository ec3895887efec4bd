"""`delete --force` racing `start`: the start is refused while the delete ends the runner, so
no VM runs on without a record (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirt.host import manager as mgr
from pyvirt.host.models import VmCreate
from pyvirt.host.paths import proc_start_time


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
