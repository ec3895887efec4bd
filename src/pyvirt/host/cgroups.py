"""CPU quota and memory ceiling per VM with Linux control groups (v1 or v2).

Each runner goes into its own cgroup `pyvirt-<daemon>/<vm-id>` below the
daemon's own cgroup, in each controller it uses; <daemon> is a digest of the
daemon's state directory, so daemons with different state directories never
touch each other's VMs (a daemon removes the cgroups of its own VMs that are
not running, and only those):

    v1: <cpu mount>/<own>/pyvirt-<daemon>/<id>/cpu.cfs_quota_us, cpu.cfs_period_us
        <memory mount>/<own>/pyvirt-<daemon>/<id>/memory.limit_in_bytes
    v2: <unified mount>/<own>/pyvirt-<daemon>/<id>/cpu.max ("QUOTA PERIOD"), memory.max
        (the cpu and memory controllers enabled in the subtree_control of
        <own> and <own>/pyvirt-<daemon>)

v1 is used where the cpu and memory controllers are mounted as v1 (a hybrid
host's unified hierarchy then has none); v2 where the unified hierarchy holds
them.  `PYVIRT_CGROUP=none` turns limits off.  Where neither works (no
controllers, no permission), VMs still run and `Support.reason` says why the
limits are not enforced; the daemon shows it in its info and in each VM's
inspect.  The cgroup directories go when the VM ends (anything still in them is killed first).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

PERIOD_US = 100_000
BASE = "pyvirt"


@dataclass
class Support:
    version: str | None                   # "v1", "v2" or None
    bases: dict[str, Path] = field(default_factory=dict)    # controller -> .../pyvirt
    reason: str | None = None             # why (some) limits are not enforced

    @property
    def cpu(self) -> bool:
        return "cpu" in self.bases

    @property
    def memory(self) -> bool:
        return "memory" in self.bases

    def describe(self) -> dict[str, object]:
        return {"version": self.version, "cpu": self.cpu, "memory": self.memory,
                "enforced": self.cpu and self.memory, "reason": self.reason,
                "paths": {k: str(v) for k, v in self.bases.items()}}


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, type, options) of the cgroup file systems."""
    out: list[tuple[str, str, set[str]]] = []
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            out.append((parts[1].replace("\\040", " "), parts[2], set(parts[3].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path."""
    own: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return own
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            own[c] = path
    return own


def _make_base(mount: str, own: str, scope: str = "") -> Path:
    base = Path(mount) / own.lstrip("/") / (f"{BASE}-{scope}" if scope else BASE)
    base.mkdir(mode=0o755, exist_ok=True)
    return base


def detect(scope: str = "") -> Support:
    """What this host allows; `scope` (the daemon's) names its own subtree `pyvirt-<scope>`."""
    if os.environ.get("PYVIRT_CGROUP", "").lower() in ("none", "off", "0"):
        return Support(None, reason="cgroup limits are turned off (PYVIRT_CGROUP=none)")
    mounts = _mounts()
    own = _own_paths()
    v1 = {c: m for m, t, opts in mounts if t == "cgroup" for c in ("cpu", "memory") if c in opts}
    if v1:
        sup = Support("v1")
        problems = []
        for c in ("cpu", "memory"):
            if c not in v1:
                problems.append(f"no {c} controller is mounted")
                continue
            try:
                sup.bases[c] = _make_base(v1[c], own.get(c, "/"), scope)
            except OSError as e:
                problems.append(f"cannot make a {c} cgroup under {v1[c]}: {e.strerror}")
        sup.reason = "; ".join(problems) or None
        return sup
    unified = next((m for m, t, _ in mounts if t == "cgroup2"), None)
    if unified is None:
        return Support(None, reason="no cgroup file system is mounted")
    return _detect_v2(unified, own.get("", "/"), scope)


def _detect_v2(mount: str, own: str, scope: str = "") -> Support:
    sup = Support("v2")
    try:
        available = set((Path(mount) / own.lstrip("/") / "cgroup.controllers").read_text().split())
    except OSError as e:
        return Support(None, reason=f"cannot read the cgroup v2 controllers: {e.strerror}")
    wanted = [c for c in ("cpu", "memory") if c in available]
    problems = [f"the {c} controller is not available to this cgroup" for c in ("cpu", "memory")
                if c not in available]
    try:
        base = _make_base(mount, own, scope)
        ctl = " ".join(f"+{c}" for c in wanted)
        if ctl:
            # (fails with EBUSY where the daemon's own cgroup holds processes and is not the root)
            (base.parent / "cgroup.subtree_control").write_text(ctl)
            (base / "cgroup.subtree_control").write_text(ctl)
        for c in wanted:
            sup.bases[c] = base
    except OSError as e:
        problems.append(f"cannot delegate cgroup v2 controllers below {mount}{own}: {e.strerror}")
        sup.bases.clear()
    sup.reason = "; ".join(problems) or None
    if not sup.bases:
        sup.version = None
    return sup


@dataclass
class Placement:
    """Where one runner went and what is enforced."""

    dirs: list[Path]
    cpu_quota: float | None = None         # enforced CPU quota (CPUs), None: none
    memory_limit: int | None = None        # enforced memory ceiling (bytes)
    reason: str | None = None              # what could not be enforced, and why

    def describe(self) -> dict[str, object]:
        return {"cgroups": [str(d) for d in self.dirs], "cpu_quota": self.cpu_quota,
                "memory_limit": self.memory_limit, "reason": self.reason}


def place(sup: Support, vm_id: str, pid: int, cpu_quota: float | None, memory_limit: int) -> Placement:
    """Put process `pid` into pyvirt-<daemon>/<vm_id> with these limits (as far as the host allows)."""
    pl = Placement([], reason=sup.reason)
    problems = [sup.reason] if sup.reason else []
    made: dict[Path, Path] = {}
    for ctrl, base in sup.bases.items():
        try:
            d = made.get(base)
            if d is None:
                d = base / vm_id
                d.mkdir(exist_ok=True)
                made[base] = d
                pl.dirs.append(d)
            if ctrl == "cpu":
                _set_cpu(sup.version, d, cpu_quota)
                pl.cpu_quota = cpu_quota
            else:
                _set_memory(sup.version, d, memory_limit)
                pl.memory_limit = memory_limit
            (d / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            problems.append(f"cannot set the {ctrl} limit in {base / vm_id}: {e.strerror}")
    pl.reason = "; ".join(problems) or None
    return pl


def _set_cpu(version: str | None, d: Path, quota: float | None) -> None:
    if version == "v2":
        (d / "cpu.max").write_text(f"{round(quota * PERIOD_US)} {PERIOD_US}" if quota else f"max {PERIOD_US}")
    else:
        (d / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (d / "cpu.cfs_quota_us").write_text(str(round(quota * PERIOD_US)) if quota else "-1")


def _set_memory(version: str | None, d: Path, limit: int) -> None:
    (d / ("memory.max" if version == "v2" else "memory.limit_in_bytes")).write_text(str(limit))


def remove(dirs: list[str] | list[Path], wait: float = 1.0) -> None:
    """Remove a VM's cgroups once its runner has ended: what is left in them (helpers the
    runner started, such as passt, orphaned by a crash) is killed first."""
    import signal
    import time

    for d in map(Path, dirs):
        deadline = time.monotonic() + wait
        while d.is_dir():
            try:
                procs = [int(p) for p in (d / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                procs = []
            for pid in procs:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            try:
                os.rmdir(d)
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)


def leftovers(sup: Support) -> list[Path]:
    """The per-VM cgroups below this daemon's pyvirt-<daemon>/ (to remove those of its VMs that are
    not running)."""
    return [d for base in set(sup.bases.values()) if base.is_dir() for d in base.iterdir() if d.is_dir()]
