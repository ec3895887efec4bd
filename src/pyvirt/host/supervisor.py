"""pyvirtd's runner supervision: one runner process per running VM, started, watched, ended.

State machine (VmRecord.state):

    stopped --start--> running --pause--> paused --resume--> running
    running/paused --stop (guest powers off) / kill / guest powers off--> stopped
    running/paused --runner dies unexpectedly (signal, non-zero exit)--> crashed
    running/paused/stopped/crashed --migrate (host/migration.py)--> migrated (it is elsewhere now)
    crashed --start--> running;  stopped/crashed/migrated --delete--> (gone)

A runner is started in its own session, so it outlives the daemon; the
monitor thread notices when one ends (waitpid for the daemon's own children,
PID + start time for runners adopted after a restart) and reads the runner's
exit.json to tell a power-off or a kill (stopped) from a crash.  The daemon
talks to a runner only through typed control messages (host/control.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pyvirt.errors import one_line
from pyvirt.host import cgroups, control, jail, migration
from pyvirt.host.errors import Conflict, Invalid, NotFound
from pyvirt.host.models import Limits
from pyvirt.host.paths import VmPaths, proc_start_time, vm_paths
from pyvirt.host.store import Store, VmRecord

log = logging.getLogger("pyvirtd")
START_TIMEOUT = 30.0           # the runner's control socket answers within this
KILL_WAIT = 5.0                # after a kill request, before SIGKILL
MONITOR_INTERVAL = 0.2
HOUSEKEEPING = 2.0             # seconds between runs of the housekeeping jobs

R = TypeVar("R", bound=control.Done)


class Supervisor:
    """The runners of one state directory: spawning, the control channel, noticing ends
    (recorded in the store), a reboot's new runner, and finding runners again after a
    daemon restart."""

    def __init__(self, state: Path, store: Store, lock: threading.RLock, jail: bool) -> None:
        self.state = state
        self.store = store
        self.lock = lock
        self.jail = jail
        # (one subtree per state directory: daemons never touch each other's VMs' cgroups)
        self.cgroups = cgroups.detect(hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:12])
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.expected_end: set[str] = set()      # ids being stopped or killed on purpose
        self.deleting: set[str] = set()          # ids being deleted: not started meanwhile
        # incoming migrations by VM name (host/migration.py): an arriving VM's runner is one of these
        self.migrations_incoming: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._housekeeper: threading.Thread | None = None
        self._disks_seen: dict[str, int] = {}     # id -> disks.json's mtime_ns when last recorded
        self.housekeeping: list[Callable[[], None]] = []    # run every HOUSEKEEPING s (their own thread)

    def watch(self) -> None:
        self._monitor = threading.Thread(target=self._monitor_loop, name="pyvirtd-monitor", daemon=True)
        self._monitor.start()
        # (a thread of its own: a job that asks runners does not hold up noticing ends)
        self._housekeeper = threading.Thread(target=self._housekeeping_loop, name="pyvirtd-housekeeping",
                                             daemon=True)
        self._housekeeper.start()

    def close(self) -> None:
        self._stop.set()
        for t in (self._monitor, self._housekeeper):
            if t is not None:
                t.join(timeout=2)

    # -- records ----------------------------------------------------------------------------
    def get(self, name: str) -> VmRecord:
        rec = self.store.get(name)
        if rec is None:
            raise NotFound(f"no VM named {name}")
        return rec

    def paths(self, rec: VmRecord) -> VmPaths:
        return vm_paths(self.state, rec.id)

    def current(self, name: str) -> VmRecord:
        """`name`'s record with its runner's end (if it ended) recorded."""
        with self.lock:
            rec = self.get(name)
            self.check(rec)
            return self.get(rec.id)

    def running(self, name: str) -> VmRecord:
        rec = self.current(name)
        if not rec.alive:
            raise Conflict(f"VM {rec.name} is not running (state: {rec.state})")
        return rec

    # -- the control channel ---------------------------------------------------------------
    def call(self, rec: VmRecord, req: control.Request, reply: type[R], timeout: float | None = None,
             fds: list[int] | None = None) -> R:
        """`req` to `rec`'s runner (with the descriptors `fds` passed along); its reply (of type
        `reply`).  A runner that does not answer, answers garbage or refuses is one Conflict."""
        try:
            out = control.call(self.paths(rec).control_sock, req, timeout=timeout, fds=fds)
        except control.Refused as e:
            raise Conflict(f"VM {rec.name}: {e}") from None
        except control.ControlError as e:
            raise Conflict(f"VM {rec.name}: the runner does not answer ({e})") from None
        if not isinstance(out, reply):           # (req.Reply is `reply`: a programming error)
            raise Conflict(f"VM {rec.name}: the runner's reply to {req.op} is a {type(out).__name__}")
        return out

    def status(self, rec: VmRecord, timeout: float = 2) -> control.StatusReply | None:
        """The runner's status, or None when it does not answer properly."""
        try:
            return self.call(rec, control.Status(), control.StatusReply, timeout=timeout)
        except Conflict:
            return None

    # -- starting ----------------------------------------------------------------------------
    def spawn(self, rec: VmRecord, extra: dict[str, Any] | None = None,
              pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        p = self.paths(rec)
        p.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for f in (p.exit_file, p.control_sock, p.dir / control.DISKS_FILE,   # (disks.json: recorded at the end)
                  p.dir / "jail.json"):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        tmp = p.config.with_name("config.json.tmp")
        tmp.write_text(json.dumps({"id": rec.id, "name": rec.name, "spec": rec.spec_dict, "jail": self.jail,
                                   **(extra or {})}) + "\n")
        os.replace(tmp, p.config)
        with open(p.runner_log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pyvirt.host.runner", "--id", rec.id,
                                     "--state-dir", str(self.state)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True,
                                    start_new_session=True, pass_fds=pass_fds)
        limits = Limits.model_validate(rec.limits_dict)
        placement = cgroups.place(self.cgroups, rec.id, proc.pid, limits.cpu_quota, limits.memory_limit)
        self.children[rec.id] = proc
        self.expected_end.discard(rec.id)
        self.store.update(rec.id, state="running", desired="running", pid=proc.pid,
                          pid_start=proc_start_time(proc.pid), control=str(p.control_sock),
                          started=time.time(), exit_status=None, reason=None,
                          cgroup=json.dumps(placement.describe()))
        return proc

    def wait_ready(self, rec: VmRecord, proc: subprocess.Popen[bytes], force_end: Any = None) -> None:
        p = self.paths(rec)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with self.lock:
                    self.check(self.get(rec.id))
                if exit_info(p).get("reason") == "poweroff":
                    return                      # it started, and the guest has finished already
                why = exit_info(p).get("error") or self.get(rec.id).reason
                raise Invalid(f"VM {rec.name} could not start: {why}")
            if p.control_sock.exists() and self.status(rec) is not None:
                return
            time.sleep(0.05)
        (force_end or self.force_end)(self.get(rec.id))
        raise Invalid(f"VM {rec.name} did not come up within {START_TIMEOUT:.0f} s (see {p.runner_log})")

    # -- ending ------------------------------------------------------------------------------
    def force_end(self, rec: VmRecord, why: str = "killed") -> None:
        """End the runner: the kill request (disks flushed), then SIGKILL to its process group."""
        self.expected_end.add(rec.id)
        with contextlib.suppress(Conflict):
            self.call(rec, control.Kill(), control.Done)
        if not self.wait_end(rec, KILL_WAIT) and rec.pid and proc_start_time(rec.pid) == rec.pid_start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.pid, signal.SIGKILL)
            self.wait_end(rec, KILL_WAIT)
        with self.lock:
            cur = self.get(rec.id)
            if cur.state == "stopped" and cur.reason == "killed" and why != "killed":
                self.store.update(rec.id, reason=why)

    def wait_end(self, rec: VmRecord, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                cur = self.store.get(rec.id)
                if cur is None:
                    return True
                self.check(cur)
                if not self.get(rec.id).alive:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    # -- noticing ends -----------------------------------------------------------------------
    def check(self, rec: VmRecord) -> None:
        """If `rec`'s runner has ended, record how (call with the lock held)."""
        if not rec.alive:
            return
        proc = self.children.get(rec.id)
        if proc is not None and proc.pid == rec.pid:
            code = proc.poll()
            if code is None:
                return
            self._ended(rec, code)
        elif rec.pid is None or proc_start_time(rec.pid) != rec.pid_start:
            self._ended(rec, None)

    def _ended(self, rec: VmRecord, code: int | None) -> None:
        if migration.incoming_failed(self, rec):           # an incoming migration that did not arrive
            return
        self.children.pop(rec.id, None)
        with contextlib.suppress(OSError, ValueError):        # what the jail kept it from removing
            jail.remove_leftovers(json.loads((self.paths(rec).dir / "jail.json").read_text()))
        self.sync_disks(rec)                    # (a snapshot the daemon did not see end)
        info = exit_info(self.paths(rec))
        expected = rec.id in self.expected_end
        self.expected_end.discard(rec.id)
        exit_status = None
        if (info.get("reason") == "reboot" and not expected and rec.desired == "running"
                and rec.id not in self.deleting):
            self._reboot(rec)
            return
        if info.get("reason") == "poweroff":
            state, reason, exit_status = "stopped", "poweroff", info.get("exit_status")
        elif info.get("reason") == "snapshot":
            state, reason = "stopped", f"saved to the snapshot {info.get('dir')}"
        elif info.get("reason") == "migrated":
            state, reason = "migrated", f"migrated to {info.get('to')}"
        elif info.get("reason") == "killed":
            state, reason = "stopped", "killed"
        elif info.get("reason") == "reboot":           # (a jailed guest rebooting while it was stopped)
            state, reason = "stopped", "the guest rebooted while it was being stopped"
        elif info.get("reason") == "error":
            state, reason = "crashed", f"error: {info.get('error')}"
        elif expected:
            state, reason = "stopped", "killed"
        elif code is not None and code < 0:
            state, reason = "crashed", f"the runner was killed by {_signame(-code)}"
        elif code is not None:
            last = last_error_line(self.paths(rec).runner_log)
            state, reason = "crashed", (f"the runner exited with status {code}: {last}" if last
                                        else f"the runner exited with status {code} without reporting why")
        else:
            state, reason = "crashed", "the runner disappeared without reporting why"
        self.store.update(rec.id, state=state, reason=reason, exit_status=exit_status, pid=None,
                          pid_start=None, control=None, cgroup=None)
        status = f", exit status {exit_status}" if exit_status is not None else ""
        (log.warning if state == "crashed" else log.info)("VM %s %s: %s%s", rec.name, state, reason, status)
        self._release(rec)

    def _release(self, rec: VmRecord) -> None:
        """What an ended runner leaves: its cgroups and its sockets."""
        if rec.cgroup:
            cgroups.remove(json.loads(rec.cgroup)["cgroups"])
        p = self.paths(rec)
        for f in (p.control_sock, p.console_sock, p.agent_sock):
            with contextlib.suppress(OSError):
                f.unlink()

    def _reboot(self, rec: VmRecord) -> None:
        """A runner that ended on its guest's reboot (exit.json "reboot": one whose Vm does not
        reset in place -- today's runners do): start a new one on the disks it recorded, as
        `start` does (call with the lock held)."""
        self._release(rec)
        try:
            self.spawn(self.get(rec.id))
        except Exception as e:              # recorded as a crash rather than lost
            self.store.update(rec.id, state="crashed", reason=f"error: could not start it again after a "
                              f"reboot: {e}", pid=None, pid_start=None, control=None, cgroup=None)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL):
            try:
                with self.lock:
                    for rec in self.store.all():
                        self.check(rec)
                        self._disks_moved(rec)
            except Exception as e:                # keep watching whatever happens
                log.error("monitor: %s", e)

    def _housekeeping_loop(self) -> None:
        while not self._stop.wait(HOUSEKEEPING):
            for job in self.housekeeping:
                try:
                    job()
                except Exception as e:            # go on whatever happens
                    log.error("housekeeping: %s", e)

    def _disks_moved(self, rec: VmRecord) -> None:
        """A running VM's disks.json, recorded when it changed: a runner that moved to new
        overlays in a snapshot this daemon did not see end (it was restarted meanwhile) writes
        where the store says within a monitor interval, not only when it ends (lock held)."""
        if not rec.alive:
            self._disks_seen.pop(rec.id, None)
            return
        try:
            mtime = (self.paths(rec).dir / control.DISKS_FILE).stat().st_mtime_ns
        except OSError:
            return
        if self._disks_seen.get(rec.id) != mtime:
            self._disks_seen[rec.id] = mtime
            self.sync_disks(rec)

    def sync_disks(self, rec: VmRecord) -> None:
        """Record the disks the runner reported it writes now (<vm dir>/disks.json, written
        by the runner before its guest runs on new overlays after a snapshot).  Only new
        overlays in the VM's own disks/ directory are taken (call with the lock held)."""
        vm_dir = self.paths(rec).dir
        try:
            disks = json.loads((vm_dir / control.DISKS_FILE).read_text())
        except (OSError, ValueError):
            return
        cur = self.store.get(rec.id)
        if cur is None or not isinstance(disks, list):
            return
        spec = cur.spec_dict
        if len(disks) != len(spec.get("disks", [])):
            return
        own = (vm_dir / "disks").resolve()
        changed = False
        for disk, new in zip(spec["disks"], disks):
            path = new.get("path") if isinstance(new, dict) else None
            if not isinstance(path, str) or path == disk["path"] or new.get("format") != "qcow2":
                continue
            real = Path(path).resolve()
            if real.is_relative_to(own) and real.is_file():
                disk.update(path=str(real), format="qcow2")
                changed = True
        if changed:
            self.store.update(rec.id, spec=json.dumps(spec))

    # -- after a daemon (re)start ----------------------------------------------------------------
    def recover(self) -> None:
        """Find the runners that are still there (PID + start time, and the control socket's
        status says running or paused); record the others' ends; remove the cgroups of VMs
        that are not running."""
        live_ids = set()
        with self.lock:
            for rec in self.store.all():
                if not rec.alive:
                    continue
                self.check(rec)
                cur = self.get(rec.id)
                if not cur.alive:
                    continue
                live_ids.add(rec.id)
                log.info("found VM %s running (runner pid %s)", cur.name, cur.pid)
                self.sync_disks(rec)           # (the daemon ended during a snapshot)
                st = self.status(rec, timeout=3)
                if st is not None and st.state != cur.state:
                    self.store.update(rec.id, state=st.state)
        for d in cgroups.leftovers(self.cgroups):
            if d.name not in live_ids:
                cgroups.remove([d])


def exit_info(p: VmPaths) -> dict[str, Any]:
    try:
        info = json.loads(p.exit_file.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def last_error_line(path: Path, limit: int = 8192) -> str:
    """The last line of a runner's log (its stderr) when it is an exception's last line
    ("PermissionError: ..."), made one line and short; "" otherwise.  Read from the file's
    last `limit` bytes only: the log is the runner's, bounded by nothing else."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            tail = f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln for ln in tail.split("\n") if ln.strip()]
    if not lines or not re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", lines[-1]):
        return ""
    text = one_line(lines[-1].strip())
    return text if len(text) <= 300 else text[:297] + "..."
