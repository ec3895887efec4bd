"""The daemon's VM manager: definitions in the store, one runner process per running VM.

State machine (VmRecord.state):

    stopped --start--> running --pause--> paused --resume--> running
    running/paused --stop (guest powers off) / kill / guest powers off--> stopped
    running/paused --runner dies unexpectedly (signal, non-zero exit)--> crashed
    crashed --start--> running;  stopped/crashed --delete--> (gone)

A runner is started in its own session, so it outlives the daemon; the
monitor thread notices when one ends (waitpid for the daemon's own children,
PID + start time for runners adopted after a restart) and reads the runner's
exit.json to tell a power-off or a kill (stopped) from a crash.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pyvirt.errors import ConfigError
from pyvirt.guestcmd import AGENT_PORT
from pyvirt.host import cgroups, control, jail, migration
from pyvirt.host.errors import Conflict, Invalid, NotFound
from pyvirt.host.models import Limits, VmCreate, to_spec
from pyvirt.host.paths import VmPaths, proc_start_time, vm_paths
from pyvirt.host.snapshots import SnapshotOps, disk_usage
from pyvirt.host.store import DuplicateName, SnapshotRecord, SnapshotStore, Store, VmRecord
from pyvirt.spec import format_size
from pyvirt.version import __version__
from pyvirt.vmm.snapfiles import overlay_name

log = logging.getLogger("pyvirtd")
START_TIMEOUT = 30.0           # the runner's control socket answers within this
KILL_WAIT = 5.0                # after a kill request, before SIGKILL
MONITOR_INTERVAL = 0.2
LOG_TAIL = 64 * 1024
MAX_LOG_READ = 1 << 20


class Manager(SnapshotOps):
    def __init__(self, state: Path, jail: bool | None = None) -> None:
        self.state = state
        # each runner confines itself once its board is built (host/jail.py) unless turned off
        self.jail = os.environ.get("PYVIRT_JAIL", "on") != "off" if jail is None else jail
        (state / "vms").mkdir(mode=0o700, exist_ok=True)
        self.store = Store(state / "pyvirtd.db")
        self.snapshots = SnapshotStore(self.store)
        self.snapshot_locks: dict[str, threading.Lock] = {}
        # (one subtree per state directory: daemons never touch each other's VMs' cgroups)
        self.cgroups = cgroups.detect(hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:12])
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.expected_end: set[str] = set()      # ids being stopped or killed on purpose
        self.deleting: set[str] = set()          # ids being deleted: not started meanwhile
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self.recover()
        self._monitor = threading.Thread(target=self._monitor_loop, name="pyvirtd-monitor", daemon=True)
        self._monitor.start()

    def close(self) -> None:
        """Stop watching (the runners go on; a restarted daemon finds them again)."""
        self._stop.set()
        self._monitor.join(timeout=2)
        self.store.close()

    # -- lookups -------------------------------------------------------------------------
    def _get(self, name: str) -> VmRecord:
        rec = self.store.get(name)
        if rec is None:
            raise NotFound(f"no VM named {name}")
        return rec

    def paths(self, rec: VmRecord) -> VmPaths:
        return vm_paths(self.state, rec.id)

    def info(self) -> dict[str, Any]:
        recs = self.store.all()
        return {"name": "pyvirtd", "version": __version__, "pid": os.getpid(), "state_dir": str(self.state),
                "cgroups": self.cgroups.describe(), "jail": self.jail,
                "vms": {s: sum(r.state == s for r in recs) for s in ("running", "paused", "stopped", "crashed")}}

    def inspect(self, name: str) -> dict[str, Any]:
        with self.lock:
            rec = self._get(name)
            self._check(rec)
            rec = self._get(rec.id)
        p = self.paths(rec)
        placement = json.loads(rec.cgroup) if rec.cgroup else None
        limits = rec.limits_dict
        if placement is not None:
            enforced = {"cpu_quota": placement["cpu_quota"], "memory_limit": placement["memory_limit"],
                        "reason": placement["reason"], "cgroups": placement["cgroups"]}
        else:
            enforced = {"reason": self.cgroups.reason or "the VM is not running"}
        out: dict[str, Any] = {
            "id": rec.id, "name": rec.name, "state": rec.state, "desired": rec.desired,
            "created": rec.created, "started": rec.started, "pid": rec.pid, "exit_status": rec.exit_status,
            "reason": rec.reason, "spec": rec.spec_dict,
            "limits": {**limits, "enforced": enforced},
            "paths": {"dir": str(p.dir), "console_log": str(p.console_log),
                      "console_socket": str(p.console_sock), "control_socket": str(p.control_sock)},
        }
        out["jail"] = self._jail_report(rec)
        if rec.alive:
            with contextlib.suppress(control.ControlError):
                st = control.request(p.control_sock, "status", timeout=2)
                out["runner"] = {k: st.get(k) for k in ("instructions", "resets", "agent", "console_attached")}
        return out

    def _jail_report(self, rec: VmRecord) -> dict[str, Any]:
        """Which of the jail's layers are on for the running runner (its jail.json), each
        off one with the reason."""
        if not rec.alive:
            return {"reason": "the VM is not running"}
        try:
            report = json.loads((self.paths(rec).dir / "jail.json").read_text())
        except (OSError, ValueError):
            return {"reason": "not reported (yet) by the runner"}
        return {name: (layer if layer.get("on") else {"on": False, "reason": layer.get("reason")})
                for name, layer in report.items() if isinstance(layer, dict)}

    def list(self) -> list[dict[str, Any]]:
        with self.lock:
            for rec in self.store.all():
                self._check(rec)
        return [{"id": r.id, "name": r.name, "state": r.state, "pid": r.pid,
                 "cpus": r.spec_dict.get("cpus"), "memory": r.spec_dict.get("memory"),
                 "exit_status": r.exit_status, "reason": r.reason} for r in self.store.all()]

    def logs(self, name: str, tail: int = LOG_TAIL, offset: int | None = None) -> tuple[int, bytes, int]:
        """(start, bytes, end) of the console log: its last `tail` bytes, or from `offset` on
        (at most MAX_LOG_READ bytes at a time)."""
        rec = self._get(name)
        try:
            with open(self.paths(rec).console_log, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if offset is not None and offset > size:
                    offset = 0                  # the log was rotated: go on from its start
                start = max(0, size - tail) if offset is None else offset
                f.seek(start)
                data = f.read(min(size - start, MAX_LOG_READ))
        except FileNotFoundError:
            return 0, b"", 0
        return start, data, start + len(data)

    # -- definitions ---------------------------------------------------------------------
    def create(self, req: VmCreate) -> dict[str, Any]:
        try:
            spec, limits = to_spec(req)
        except ConfigError as e:
            raise Invalid(str(e)) from None
        rec = VmRecord(id=uuid.uuid4().hex[:12], name=req.name, spec=spec.model_dump_json(),
                       limits=limits.model_dump_json(), desired="stopped", created=time.time())
        with self.lock:
            try:
                self.store.add(rec)
            except DuplicateName:
                raise Conflict(f"a VM named {req.name} exists already") from None
        log.info("created VM %s (id %s): %d cpu(s), %s of RAM", rec.name, rec.id, spec.cpus,
                 format_size(spec.memory))
        return self.inspect(rec.id)

    def delete(self, name: str, force: bool = False) -> None:
        with self.lock:
            rec = self._get(name)
            self._check(rec)
            rec = self._get(rec.id)
            if rec.alive and not force:
                raise Conflict(f"VM {rec.name} is {rec.state}: stop it first (or delete with force)")
            if rec.id in self.deleting:
                raise Conflict(f"VM {rec.name} is being deleted")
            self.check_no_snapshot_needs(rec)
            self.deleting.add(rec.id)           # a start racing the delete is refused from now on
        try:
            if rec.alive:
                self._force_end(rec)
            with self.lock:
                self._check(self._get(rec.id))
                if self._get(rec.id).alive:     # (cannot happen while `deleting` holds it)
                    raise Conflict(f"VM {rec.name} is running again: not deleted")
                self.store.delete(rec.id)
                shutil.rmtree(self.paths(rec).dir, ignore_errors=True)
        finally:
            with self.lock:
                self.deleting.discard(rec.id)
        log.info("deleted VM %s", rec.name)

    # -- export / import (host/archive.py) ----------------------------------------------------
    def export(self, name: str, path: str, snapshot: str | None = None) -> dict[str, Any]:
        """Write VM `name` (stopped or crashed) to the new archive `path`; or, at any state,
        the VM as of its snapshot `snapshot` together with that snapshot (state, RAM and
        its disks, which are the exported VM's)."""
        from pyvirt.host import archive
        from pyvirt.vmm.snapshot import read_manifest
        _absolute(path)
        with self.lock:
            rec = self._get(name)
            self._check(rec)
            rec = self._get(rec.id)
        spec = rec.spec_dict
        snap_export = None
        if snapshot is not None:
            snap = self._snapshot(snapshot)
            if snap.vm_id != rec.id:
                raise Conflict(f"snapshot {snapshot} is a snapshot of VM {snap.vm}, not of {rec.name}")
            d = Path(snap.dir)
            try:
                m = read_manifest(d)
                snap_export = (snap.name, d, archive.portable_snapshot(m))
            except (ConfigError, KeyError, TypeError, AttributeError) as e:
                raise Invalid(f"snapshot {snapshot} cannot be exported: {e}") from None
            spec = m["spec"]
            spec["ports"] = [p for p in spec.get("ports", []) if p.get("name") != AGENT_PORT]  # (the runner's)
            for i, d_ in enumerate(m["disks"]):
                if d_.get("kind") == "frozen":
                    spec["disks"][i].update(path=str(d / overlay_name(i)), format="qcow2")
        elif rec.alive:
            raise Conflict(f"VM {rec.name} is {rec.state}: stop it to export its disks consistently "
                           "(or export one of its snapshots)")
        try:
            m = archive.export_vm(Path(path), rec.name, spec, rec.limits_dict, snapshot=snap_export)
        except FileExistsError:
            raise Conflict(f"{path} exists already: an export never overwrites a file") from None
        except (OSError, ValueError) as e:              # (ValueError: a NUL in the path)
            raise Invalid(f"cannot write {path[:200]!r}: {getattr(e, 'strerror', None) or e}") from None
        return {"path": str(Path(path).expanduser().absolute()), "name": rec.name, "snapshot": snapshot,
                "members": m["members"], "size": os.path.getsize(Path(path).expanduser())}

    def import_(self, path: str, name: str | None = None, nets: builtins.list[str] | None = None,
                memory_limit: int | str | None = None, cpu_quota: float | None = None) -> dict[str, Any]:
        """A new, stopped VM from an export archive: checked whole before anything is kept.
        An archive with a snapshot also registers the snapshot (as a snapshot of the new VM),
        under its name in the archive or, when that is taken, NEW-NAME; else 409.

        The archive is not trusted: the VM keeps only its guest hardware and disk contents
        (archive.trusted_spec; disks are raw images, never probed); its network interfaces
        are `nets` (as --net), its host limits `memory_limit` / `cpu_quota` or the defaults
        -- never the archive's."""
        _absolute(path)
        import re

        from pyvirt.host import archive
        from pyvirt.host.models import NAME_RE, NAME_RULE, host_limits
        from pyvirt.spec import NetSpec, VmSpec
        try:
            net_specs = [json.loads(NetSpec.parse(n).model_dump_json()) for n in nets or []]
        except ConfigError as e:
            raise Invalid(str(e)) from None
        vm_id = uuid.uuid4().hex[:12]
        dest = self.paths(VmRecord(id=vm_id, name="", spec="", limits="", desired="", created=0)).dir
        try:
            m = archive.unpack(Path(path), dest)
        except archive.ArchiveError as e:
            raise Invalid(f"cannot import {path}: {e}") from None
        snap_dir: Path | None = None
        try:
            new_name = name or m.get("name")
            if not isinstance(new_name, str) or not re.fullmatch(NAME_RE, new_name):
                raise Invalid(f"cannot import {path}: {NAME_RULE}")
            try:
                spec = VmSpec.model_validate(archive.trusted_spec(m["spec"], net_specs))
            except archive.ArchiveError as e:
                raise Invalid(f"cannot import {path}: {e}") from None
            except ValueError as e:
                raise Invalid(f"cannot import {path}: invalid spec: {str(e).splitlines()[0]}") from None
            try:
                limits = host_limits(spec, memory_limit, cpu_quota)
            except ConfigError as e:
                raise Invalid(f"cannot import {path}: {e}") from None
            rec = VmRecord(id=vm_id, name=new_name, spec=spec.model_dump_json(),
                           limits=limits.model_dump_json(), desired="stopped", created=time.time())
            snap = None
            if m.get("snapshot"):
                snap_dir = self._import_snapshot_dir(m["snapshot"], new_name)
                try:
                    sm = archive.install_snapshot(dest, snap_dir, net_specs)
                except archive.ArchiveError as e:
                    raise Invalid(f"cannot import {path}: {e}") from None
                frozen = [d["path"] for d in sm["disks"] if d["kind"] == "frozen"]
                snap = SnapshotRecord(name=snap_dir.name, vm=new_name, vm_id=vm_id, dir=str(snap_dir),
                                      created=time.time(), memory=sm["memory"], size=disk_usage(snap_dir),
                                      version=sm["version"], frozen=json.dumps(frozen))
            with self.lock:
                try:
                    self.store.add(rec)
                except DuplicateName:
                    raise Conflict(f"a VM named {new_name} exists already (import it with another name)") \
                        from None
                if snap is not None:
                    try:
                        self.snapshots.add(snap)
                    except DuplicateName:
                        self.store.delete(vm_id)
                        raise Conflict(f"a snapshot named {snap.name} exists already") from None
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            if snap_dir is not None:
                shutil.rmtree(snap_dir, ignore_errors=True)
            raise
        for d in (dest, snap_dir):              # recorded: no longer an unfinished import
            if d is not None:
                (d / archive.INCOMPLETE).unlink(missing_ok=True)
        out = self.inspect(vm_id)
        if snap is not None:
            out["snapshot"] = snap.name
        return out

    def _import_snapshot_dir(self, archived: str, vm_name: str) -> Path:
        """A free path for an imported snapshot: <state>/snapshots/NAME (NAME the
        archive's), or VM-NAME when NAME is taken."""
        import re

        from pyvirt.host.models import NAME_RE
        (self.state / "snapshots").mkdir(mode=0o700, exist_ok=True)
        for n in (archived, f"{vm_name}-{archived}"):
            d = self.state / "snapshots" / n
            if re.fullmatch(NAME_RE, n) and self.snapshots.get(n) is None and not d.exists():
                return d
        raise Conflict(f"a snapshot named {archived} (and one named {vm_name}-{archived}) exists already: "
                       "import with another --name, or delete it first")

    # -- life cycle ----------------------------------------------------------------------
    def start(self, name: str) -> dict[str, Any]:
        with self.lock:
            rec = self._get(name)
            self._check(rec)
            rec = self._get(rec.id)
            if rec.alive or rec.state == "migrated":
                raise Conflict(f"VM {rec.name} is already {rec.state}")
            if rec.id in self.deleting:
                raise Conflict(f"VM {rec.name} is being deleted")
            proc = self._spawn(rec)
        self._wait_ready(rec, proc)
        log.info("started VM %s (runner pid %d)", rec.name, proc.pid)
        return self.inspect(rec.id)

    def _spawn(self, rec: VmRecord, extra: dict[str, Any] | None = None,
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
        with open(p.runner_log, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "pyvirt.host.runner", "--id", rec.id,
                                     "--state-dir", str(self.state)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
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

    def _wait_ready(self, rec: VmRecord, proc: subprocess.Popen[bytes]) -> None:
        p = self.paths(rec)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with self.lock:
                    self._check(self._get(rec.id))
                if _exit_info(p).get("reason") == "poweroff":
                    return                      # it started, and the guest has finished already
                why = _exit_info(p).get("error") or self._get(rec.id).reason
                raise Invalid(f"VM {rec.name} could not start: {why}")
            if p.control_sock.exists():
                with contextlib.suppress(control.ControlError):
                    control.request(p.control_sock, "status", timeout=2)
                    return
            time.sleep(0.05)
        self._force_end(self._get(rec.id))
        raise Invalid(f"VM {rec.name} did not come up within {START_TIMEOUT:.0f} s (see {p.runner_log})")

    def _running(self, name: str) -> VmRecord:
        with self.lock:
            rec = self._get(name)
            self._check(rec)
            rec = self._get(rec.id)
        if not rec.alive:
            raise Conflict(f"VM {rec.name} is not running (state: {rec.state})")
        return rec

    def _control(self, rec: VmRecord, op: str, **args: Any) -> dict[str, Any]:
        try:
            reply = control.request(self.paths(rec).control_sock, op, **args)
        except control.ControlError as e:
            raise Conflict(f"VM {rec.name}: the runner does not answer ({e})") from None
        if not reply.get("ok"):
            raise Conflict(f"VM {rec.name}: {reply.get('error', 'refused')}")
        return reply

    def pause(self, name: str) -> dict[str, Any]:
        rec = self._running(name)
        if rec.state == "paused":
            raise Conflict(f"VM {rec.name} is already paused")
        self._control(rec, "pause")
        self.store.update(rec.id, state="paused")
        log.info("paused VM %s", rec.name)
        return self.inspect(rec.id)

    def resume(self, name: str) -> dict[str, Any]:
        rec = self._running(name)
        if rec.state != "paused":
            raise Conflict(f"VM {rec.name} is not paused (state: {rec.state})")
        self._control(rec, "resume")
        self.store.update(rec.id, state="running")
        log.info("resumed VM %s", rec.name)
        return self.inspect(rec.id)

    def stop(self, name: str, timeout: float) -> dict[str, Any]:
        """Ask the guest to power off (through its agent); force it off after `timeout` s."""
        rec = self._running(name)
        log.info("stopping VM %s (forced off after %g s)", rec.name, timeout)
        self.expected_end.add(rec.id)
        self.store.update(rec.id, desired="stopped")
        with contextlib.suppress(Conflict):
            self._control(rec, "stop")
        if not self._wait_end(rec, timeout):
            self._force_end(rec, why=f"forced off after {timeout:g} s")
        return self.inspect(rec.id)

    def kill(self, name: str) -> dict[str, Any]:
        rec = self._running(name)
        log.info("killing VM %s", rec.name)
        self.store.update(rec.id, desired="stopped")
        self._force_end(rec)
        return self.inspect(rec.id)

    def _force_end(self, rec: VmRecord, why: str = "killed") -> None:
        """End the runner: the kill request (disks flushed), then SIGKILL to its process group."""
        self.expected_end.add(rec.id)
        with contextlib.suppress(Conflict):
            self._control(rec, "kill")
        if not self._wait_end(rec, KILL_WAIT) and rec.pid and proc_start_time(rec.pid) == rec.pid_start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.pid, signal.SIGKILL)
            self._wait_end(rec, KILL_WAIT)
        with self.lock:
            cur = self._get(rec.id)
            if cur.state == "stopped" and cur.reason == "killed" and why != "killed":
                self.store.update(rec.id, reason=why)

    def _wait_end(self, rec: VmRecord, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                cur = self.store.get(rec.id)
                if cur is None:
                    return True
                self._check(cur)
                if not self._get(rec.id).alive:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    # -- noticing ends ---------------------------------------------------------------------
    def _check(self, rec: VmRecord) -> None:
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
        self._sync_disks(rec)                   # (a snapshot the daemon did not see end)
        info = _exit_info(self.paths(rec))
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
            state, reason = "crashed", f"the runner exited with status {code} without reporting why"
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
        """A jailed runner whose guest rebooted has ended (it cannot build a new board in its
        jail): start a new one on the disks it recorded, as `start` does (call with the lock held)."""
        self._release(rec)
        try:
            self._spawn(self._get(rec.id))
        except Exception as e:              # recorded as a crash rather than lost
            self.store.update(rec.id, state="crashed", reason=f"error: could not start it again after a "
                              f"reboot: {e}", pid=None, pid_start=None, control=None, cgroup=None)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL):
            try:
                with self.lock:
                    for rec in self.store.all():
                        self._check(rec)
            except Exception as e:                # keep watching whatever happens
                log.error("monitor: %s", e)

    def recover(self) -> None:
        """After a (re)start: find the runners that are still there (PID + start time, and the
        control socket's status says running or paused); record the others' ends; remove the
        cgroups of VMs that are not running."""
        live_ids = set()
        log.info("pyvirtd %s on %s", __version__, self.state)
        with self.lock:
            for rec in self.store.all():
                if not rec.alive:
                    continue
                self._check(rec)
                cur = self._get(rec.id)
                if not cur.alive:
                    continue
                live_ids.add(rec.id)
                log.info("found VM %s running (runner pid %s)", cur.name, cur.pid)
                self._sync_disks(rec)           # (the daemon ended during a snapshot)
                with contextlib.suppress(control.ControlError):
                    st = control.request(self.paths(rec).control_sock, "status", timeout=3)
                    if st.get("state") in ("running", "paused") and st["state"] != cur.state:
                        self.store.update(rec.id, state=st["state"])
        self._remove_unfinished_imports()
        for d in cgroups.leftovers(self.cgroups):
            if d.name not in live_ids:
                cgroups.remove([d])


    def _remove_unfinished_imports(self) -> None:
        """Directories an import was filling when the daemon died (marked incomplete, not
        recorded) are removed; a recorded one only loses its mark."""
        from pyvirt.host.archive import INCOMPLETE
        with self.lock:
            vm_ids = {r.id for r in self.store.all()}
            snaps = {s.name for s in self.snapshots.all()}
        for kind, known in (("vms", vm_ids), ("snapshots", snaps)):
            top = self.state / kind
            if not top.is_dir():
                continue
            for d in top.iterdir():
                if d.is_symlink() or not d.is_dir() or not (d / INCOMPLETE).exists():
                    continue
                if d.name in known:
                    (d / INCOMPLETE).unlink(missing_ok=True)
                else:
                    shutil.rmtree(d, ignore_errors=True)


def _exit_info(p: VmPaths) -> dict[str, Any]:
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


def _absolute(path: str) -> None:
    """Archive paths name host files for the daemon: only absolute ones (a relative path would be
    resolved against the daemon's working directory, not the caller's)."""
    if not os.path.isabs(path):
        raise Invalid(f"the archive path must be absolute, not {path!r}")
