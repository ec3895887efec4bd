"""The daemon's VM manager: the one object the REST API calls.  Its public methods are
pyvirtd's operations; the work is split by responsibility over:

    host/errors.py      the errors it raises (each with its HTTP status)
    host/supervisor.py  runner supervision: spawn, the typed control channel, ends, reboots
    host/snapshots.py   snapshots: take, list, delete, restore, clone
    host/transfer.py    export to and import from archive files

VM definitions live in the store (host/store.py); one runner process per running VM.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pyvirt.errors import ConfigError
from pyvirt.host import control
from pyvirt.host.errors import Conflict, Invalid, NotFound
from pyvirt.host.models import VmCreate, to_spec
from pyvirt.host.paths import VmPaths
from pyvirt.host.snapshots import Snapshots
from pyvirt.host.store import DuplicateName, SnapshotStore, Store, VmRecord
from pyvirt.host.supervisor import Supervisor
from pyvirt.host.tls import Creds
from pyvirt.host.transfer import Transfers
from pyvirt.spec import format_size
from pyvirt.version import __version__

__all__ = ["Conflict", "Invalid", "Manager", "NotFound"]

log = logging.getLogger("pyvirtd")
LOG_TAIL = 64 * 1024
MAX_LOG_READ = 1 << 20


class Manager:
    def __init__(self, state: Path, jail: bool | None = None, tls: Creds | None = None) -> None:
        self.state = state
        self.tls = tls                  # --tls-creds: migrations over TCP use TLS (host/tls.py)
        # each runner confines itself once its board is built (host/jail.py) unless turned off
        self.jail = os.environ.get("PYVIRT_JAIL", "on") != "off" if jail is None else jail
        (state / "vms").mkdir(mode=0o700, exist_ok=True)
        self.store = Store(state / "pyvirtd.db")
        self.lock = threading.RLock()
        self.runners = Supervisor(state, self.store, self.lock, self.jail)
        self.snaps = Snapshots(self.runners, SnapshotStore(self.store))
        self.transfers = Transfers(self.snaps)
        self.cgroups = self.runners.cgroups
        self.recover()
        self.runners.watch()

    def close(self) -> None:
        """Stop watching (the runners go on; a restarted daemon finds them again)."""
        self.runners.close()
        self.store.close()

    def recover(self) -> None:
        """After a (re)start: find the runners that are still there, record the others' ends,
        remove what unfinished imports and snapshots left (and, from then on, what unfinished
        snapshots leave once their runners are done)."""
        log.info("pyvirtd %s on %s", __version__, self.state)
        self.runners.recover()
        self.transfers.remove_unfinished_imports()
        self.snaps.remove_orphans(at_start=True)
        self.runners.housekeeping.append(self.snaps.remove_orphans)

    # -- lookups -------------------------------------------------------------------------
    def _get(self, name: str) -> VmRecord:
        return self.runners.get(name)

    def _check(self, rec: VmRecord) -> None:
        self.runners.check(rec)

    def _running(self, name: str) -> VmRecord:
        return self.runners.running(name)

    def _force_end(self, rec: VmRecord, why: str = "killed") -> None:
        self.runners.force_end(rec, why)

    def paths(self, rec: VmRecord) -> VmPaths:
        return self.runners.paths(rec)

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
        st = self.runners.status(rec) if rec.alive else None
        if st is not None:
            out["runner"] = st.model_dump(include={"instructions", "resets", "agent", "console_attached"})
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
            if rec.id in self.runners.deleting:
                raise Conflict(f"VM {rec.name} is being deleted")
            self.snaps.check_no_snapshot_needs(rec)
            self.runners.deleting.add(rec.id)           # a start racing the delete is refused from now on
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
                self.runners.deleting.discard(rec.id)
        log.info("deleted VM %s", rec.name)

    # -- life cycle (host/supervisor.py runs the runners) ----------------------------------
    def start(self, name: str) -> dict[str, Any]:
        with self.lock:
            rec = self._get(name)
            self._check(rec)
            rec = self._get(rec.id)
            if rec.alive or rec.state == "migrated":
                raise Conflict(f"VM {rec.name} is already {rec.state}")
            if rec.id in self.runners.deleting:
                raise Conflict(f"VM {rec.name} is being deleted")
            proc = self.runners.spawn(rec)
        self.runners.wait_ready(rec, proc, self._force_end)
        log.info("started VM %s (runner pid %d)", rec.name, proc.pid)
        return self.inspect(rec.id)

    def pause(self, name: str) -> dict[str, Any]:
        rec = self._running(name)
        if rec.state == "paused":
            raise Conflict(f"VM {rec.name} is already paused")
        self.runners.call(rec, control.Pause(), control.StateReply)
        self.store.update(rec.id, state="paused")
        log.info("paused VM %s", rec.name)
        return self.inspect(rec.id)

    def resume(self, name: str) -> dict[str, Any]:
        rec = self._running(name)
        if rec.state != "paused":
            raise Conflict(f"VM {rec.name} is not paused (state: {rec.state})")
        self.runners.call(rec, control.Resume(), control.StateReply)
        self.store.update(rec.id, state="running")
        log.info("resumed VM %s", rec.name)
        return self.inspect(rec.id)

    def stop(self, name: str, timeout: float) -> dict[str, Any]:
        """Ask the guest to power off (through its agent); force it off after `timeout` s."""
        rec = self._running(name)
        log.info("stopping VM %s (forced off after %g s)", rec.name, timeout)
        self.runners.expected_end.add(rec.id)
        self.store.update(rec.id, desired="stopped")
        if not self._agent_poweroff(rec):
            with contextlib.suppress(Conflict):          # the console-port agent (and a paused VM resumed)
                self.runners.call(rec, control.Stop(), control.StopReply)
        if not self.runners.wait_end(rec, timeout):
            self._force_end(rec, why=f"forced off after {timeout:g} s")
        return self.inspect(rec.id)

    def _agent_poweroff(self, rec: VmRecord) -> bool:
        """Ask the guest agent (vsock) to power the guest off; False when it did not answer
        (a guest without it: the caller uses the console-port agent)."""
        from pyvirt.host.agent import Agent, AgentError
        if rec.state == "paused":
            with contextlib.suppress(Conflict):
                self.runners.call(rec, control.Resume(), control.StateReply)
                self.store.update(rec.id, state="running")
        try:
            Agent(self.runners.paths(rec).vsock_sock).poweroff(connect_timeout=2.0)
        except AgentError as e:
            log.info("VM %s: the guest agent did not take the power-off (%s): through the console port", rec.name, e)
            return False
        log.info("VM %s: powering off through the guest agent", rec.name)
        return True

    def kill(self, name: str) -> dict[str, Any]:
        rec = self._running(name)
        log.info("killing VM %s", rec.name)
        self.store.update(rec.id, desired="stopped")
        self._force_end(rec)
        return self.inspect(rec.id)

    # -- snapshots (host/snapshots.py) -----------------------------------------------------------
    def list_snapshots(self) -> builtins.list[dict[str, Any]]:
        return self.snaps.list_snapshots()

    def get_snapshot(self, name: str) -> dict[str, Any]:
        return self.snaps.get_snapshot(name)

    def take_snapshot(self, vm_name: str, name: str) -> dict[str, Any]:
        """Snapshot a running or paused VM; it goes on (a paused one stays paused)."""
        return self.snaps.take_snapshot(vm_name, name)

    def delete_snapshot(self, name: str) -> None:
        self.snaps.delete_snapshot(name)

    def restore_snapshot(self, name: str, vm_name: str | None = None) -> dict[str, Any]:
        """A new VM that goes on exactly where the snapshot was taken (same MACs, host name)."""
        return self.inspect(self.snaps.restore_snapshot(name, vm_name))

    def clone_snapshot(self, name: str, count: int, prefix: str | None = None) -> builtins.list[dict[str, Any]]:
        """`count` VMs from the snapshot, each with its own disks, MACs, port sockets and host name."""
        return [self.inspect(vm_id) for vm_id in self.snaps.clone_snapshot(name, count, prefix)]

    # -- export / import (host/transfer.py) ----------------------------------------------------
    def export(self, name: str, path: str, snapshot: str | None = None) -> dict[str, Any]:
        """Write VM `name` (stopped or crashed), or the VM as of its snapshot `snapshot`
        together with that snapshot, to the new archive `path`."""
        return self.transfers.export(name, path, snapshot)

    def import_(self, path: str, name: str | None = None, nets: builtins.list[str] | None = None,
                memory_limit: int | str | None = None, cpu_quota: float | None = None) -> dict[str, Any]:
        """A new, stopped VM from an export archive (checked whole before anything is kept)."""
        vm_id, snap = self.transfers.import_(path, name, nets, memory_limit, cpu_quota)
        out = self.inspect(vm_id)
        if snap is not None:
            out["snapshot"] = snap
        return out
