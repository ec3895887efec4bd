"""pyvirtd's snapshots: take them of running VMs, restore and clone VMs from them.

Snapshots live in <state>/snapshots/<name>/ (vmm/snapshot.py's format) and in
the store's `snapshots` table.  `Snapshots` serves the Manager's snapshot calls,
on the runners of its `Supervisor`:

* take: a VM with shared folders first has them unmounted by its guest agent
  (virtiofsd's FUSE state is not saved; a busy share refuses the snapshot in one
  line) and mounted again after it; its guest agent freezes its writable
  block-backed file systems and thaws them after the snapshot, even a failed
  one (a guest without the agent, or paused, is taken as it is: the result's
  `guest_filesystems` says which); the runner is asked (control request
  `Snapshot`, then="continue") to save the VM between slices, and answers when it
  is written; the VM goes on writing its disks through new overlays in its own
  directory (<vm dir>/disks/<random>/), which its record's
  spec then names.
* restore / clone: a new VM record (origin = the snapshot) whose runner is
  started with "restore" in its config.json: its RAM is the snapshot's `ram`
  mapped copy-on-write (read into a memfd for a VM with a share, and a fresh
  virtiofsd serves the share), its disks are overlays of its own
  (<vm dir>/disks/diskN.qcow2) over the snapshot's, its virtio-console port
  sockets are in its own directory.  A clone also gets a new random MAC per
  NIC and its own host name (sent through the guest agent right after the
  restore, with the host's clock; a VM with shared folders mounts them again).
  Started again after it stops, such a VM boots afresh from its spec (its
  overlays).
* delete: refused while a VM made from the snapshot exists (its disks back
  onto the snapshot's files); a VM is not deleted while a snapshot's frozen
  disk image lies in its directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pyvirt.errors import ConfigError
from pyvirt.guestcmd import AGENT_PORT
from pyvirt.host import control
from pyvirt.host.agent import (
    Agent,
    AgentError,
    Freeze,
    Restored,
    after_restore,
    frozen_filesystems,
    remount_shares,
    unmount_shares,
)
from pyvirt.host.errors import Conflict, Invalid, NotFound
from pyvirt.host.paths import vm_paths
from pyvirt.host.store import DuplicateName, SnapshotRecord, SnapshotStore, VmRecord
from pyvirt.host.supervisor import Supervisor
from pyvirt.spec import VmSpec, random_mac

log = logging.getLogger("pyvirtd")

MAX_CLONES = 32
ORPHAN_AGE = 60.0              # seconds before an unrecorded, unfinished snapshot directory is removed


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk for the files under `path` (sparse holes do not count)."""
    return sum(f.lstat().st_blocks * 512 for f in path.rglob("*") if f.is_file() and not f.is_symlink())


class Snapshots:
    """The snapshots of one state directory, taken of and restored into the runners of
    `runners`.  Restores answer with the new VMs' ids (the Manager describes them)."""

    def __init__(self, runners: Supervisor, snapshots: SnapshotStore) -> None:
        self.runners = runners
        self.state = runners.state
        self.store = runners.store
        self.lock = runners.lock
        self.snapshots = snapshots
        self.snapshot_locks: dict[str, threading.Lock] = {}
        self.taking: set[str] = set()            # names of the snapshots this daemon is taking

    def _snapshot(self, name: str) -> SnapshotRecord:
        snap = self.snapshots.get(name)
        if snap is None:
            raise NotFound(f"no snapshot named {name}")
        return snap

    def describe_snapshot(self, snap: SnapshotRecord) -> dict[str, Any]:
        users = [r.name for r in self.store.all() if r.origin == snap.name]
        return {**snap.describe(), "used_by": users}

    def list_snapshots(self) -> list[dict[str, Any]]:
        return [self.describe_snapshot(s) for s in self.snapshots.all()]

    def get_snapshot(self, name: str) -> dict[str, Any]:
        return self.describe_snapshot(self._snapshot(name))

    # -- taking ----------------------------------------------------------------------------
    def take_snapshot(self, vm_name: str, name: str) -> dict[str, Any]:
        """Snapshot a running or paused VM; it goes on (a paused one stays paused)."""
        rec = self.runners.running(vm_name)
        d = self.state / "snapshots" / name
        with self.lock:
            if self.snapshots.get(name) is not None or name in self.taking:
                raise Conflict(f"a snapshot named {name} exists already (or is being taken)")
            self.taking.add(name)          # (remove_orphans leaves it alone)
        try:
            d.parent.mkdir(mode=0o700, exist_ok=True)
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:
                raise Conflict(f"a snapshot named {name} exists already (or is being taken)") from None
            return self._take(rec, vm_name, name, d)
        finally:
            with self.lock:
                self.taking.discard(name)

    def _take(self, rec: VmRecord, vm_name: str, name: str, d: Path) -> dict[str, Any]:
        try:
            live = self.runners.paths(rec).dir / "disks" / uuid.uuid4().hex[:8]
            with self.lock:
                lock = self.snapshot_locks.setdefault(rec.id, threading.Lock())
            shares = bool(VmSpec.model_validate_json(rec.spec).shares)
            with lock, self._shares_let_go(rec, shares), self._frozen(rec) as freeze:
                try:
                    reply = self.runners.call(rec, control.Snapshot(dir=str(d), then="continue", live_dir=str(live),
                                                                    shares_unmounted=shares),
                                              control.SnapshotReply)
                except Conflict as e:
                    if self.runners.wait_end(rec, 2.0):
                        raise Conflict(f"VM {rec.name} ended during its snapshot ({e})") from None
                    raise
                finally:
                    with self.lock:            # the VM may write to new overlays now: record them
                        self.runners.sync_disks(rec)
            outcome = reply.snapshot
            if not outcome.ok:
                raise Conflict(f"the snapshot of VM {rec.name} failed: {outcome.error}")
            from pyvirt.vmm.snapshot import read_manifest
            m = read_manifest(d)
            frozen = {i: disk["path"] for i, disk in enumerate(m["disks"]) if disk.get("kind") == "frozen"}
            snap = SnapshotRecord(name=name, vm=rec.name, vm_id=rec.id, dir=str(d), created=time.time(),
                                  memory=m["memory"], size=disk_usage(d), version=m["version"],
                                  frozen=json.dumps(list(frozen.values())))
            try:
                self.snapshots.add(snap)
            except DuplicateName:
                raise Conflict(f"a snapshot named {name} exists already") from None
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        log.info("snapshot %s of VM %s taken into %s; its file systems: %s", name, vm_name, d, freeze.describe())
        return {**self.describe_snapshot(snap), "guest_filesystems": freeze.describe()}

    def remove_orphans(self, at_start: bool = False) -> None:
        """Remove the snapshot directories that no record names and no snapshot this daemon is
        taking fills: what a daemon killed while taking one left (its runner went on, and may
        have finished it).  A whole one (its manifest in place: nothing writes it any more)
        goes at once; an unfinished one only once no runner can be writing it (every running
        runner answers that it is not saving a snapshot) and -- but `at_start`, when nothing
        else of this daemon makes directories there -- after ORPHAN_AGE seconds.  Directories
        an import fills (marked incomplete) are Transfers'."""
        from pyvirt.host.archive import INCOMPLETE
        from pyvirt.vmm.snapfiles import MANIFEST
        top = self.state / "snapshots"
        if not top.is_dir():
            return
        with self.lock:
            known = {s.name for s in self.snapshots.all()} | self.taking
        orphans = [d for d in top.iterdir()
                   if d.name not in known and not d.is_symlink() and d.is_dir() and not (d / INCOMPLETE).exists()]
        busy: bool | None = None
        for d in orphans:
            if not (d / MANIFEST).exists():
                with contextlib.suppress(OSError):
                    if not at_start and time.time() - d.stat().st_mtime < ORPHAN_AGE:
                        continue
                if busy is None:
                    busy = self._runner_saving()
                if busy:
                    continue
            with self.lock:
                if self.snapshots.get(d.name) is not None or d.name in self.taking:
                    continue
            shutil.rmtree(d, ignore_errors=True)
            log.warning("removed %s: a snapshot left unrecorded (the daemon ended while taking it)", d)

    def _runner_saving(self) -> bool:
        """Whether some running VM's runner may be writing a snapshot: it does not answer (it
        does not while it writes one), or says a snapshot is under way."""
        for rec in self.store.all():
            if rec.alive:
                st = self.runners.status(rec)
                if st is None or (st.snapshot is not None and st.snapshot.ok is None):
                    return True
        return False

    @contextlib.contextmanager
    def _frozen(self, rec: VmRecord) -> Iterator[Freeze]:
        """The guest's file systems frozen by its agent for the time of the snapshot (a guest
        without the agent, or a paused one, is snapshotted as it is)."""
        if rec.state == "paused":
            yield Freeze(note="the VM is paused (its guest agent cannot answer)")
            return
        with frozen_filesystems(Agent(self.runners.paths(rec).vsock_sock)) as freeze:
            yield freeze

    @contextlib.contextmanager
    def _shares_let_go(self, rec: VmRecord, shares: bool) -> Iterator[None]:
        """With `shares`: the VM's shared folders unmounted in the guest for the time of the
        snapshot (by its guest agent), mounted again after it."""
        if not shares:
            yield
            return
        if rec.state == "paused":
            raise Conflict(f"cannot snapshot VM {rec.name}: it is paused, and its guest agent must unmount "
                           "its shared folders first (resume it)")
        agent = Agent(self.runners.paths(rec).vsock_sock)
        try:
            unmount_shares(agent)
        except AgentError as e:
            raise Conflict(f"cannot snapshot VM {rec.name}: {e}") from None
        try:
            yield
        finally:
            try:
                remount_shares(agent)
            except AgentError as e:
                log.warning("VM %s: its shared folders are not mounted again after the snapshot: %s",
                            rec.name, e)

    # -- deleting --------------------------------------------------------------------------
    def delete_snapshot(self, name: str) -> None:
        with self.lock:
            snap = self._snapshot(name)
            users = [r.name for r in self.store.all() if r.origin == name]
            if users:
                raise Conflict(f"snapshot {name} is used by VM(s) {', '.join(users)} (made from it): "
                                         "delete them first")
            self.snapshots.delete(name)
        shutil.rmtree(snap.dir, ignore_errors=True)
        log.info("deleted snapshot %s", name)

    def check_no_snapshot_needs(self, rec: VmRecord) -> None:
        """Refuse to delete `rec` while a snapshot's disks back onto an image in its directory."""
        vm_dir = self.runners.paths(rec).dir.resolve()          # (both resolved: a symlink in the state
        for snap in self.snapshots.all():               # directory's path must not hide one)
            for path in json.loads(snap.frozen):
                if Path(path).resolve().is_relative_to(vm_dir):
                    raise Conflict(f"snapshot {snap.name} is built on VM {rec.name}'s disk "
                                             f"{Path(path).name}: delete the snapshot first")

    # -- restoring and cloning -------------------------------------------------------------
    def restore_snapshot(self, name: str, vm_name: str | None = None) -> str:
        """A new VM that goes on exactly where the snapshot was taken (same MACs, host name)."""
        return self._restore(name, [vm_name or f"{name}-{uuid.uuid4().hex[:6]}"], clone=False)[0]

    def clone_snapshot(self, name: str, count: int, prefix: str | None = None) -> list[str]:
        """`count` VMs from the snapshot, named PREFIX-1..PREFIX-count, each with its own disks,
        MACs, port sockets and host name."""
        if not 1 <= count <= MAX_CLONES:
            raise Invalid(f"count must be 1 to {MAX_CLONES}, not {count}")
        return self._restore(name, [f"{prefix or name}-{i}" for i in range(1, count + 1)], clone=True)

    def _open_snapshot(self, name: str) -> tuple[SnapshotRecord, dict[str, Any], VmSpec]:
        from pyvirt.vmm.snapshot import read_manifest
        snap = self._snapshot(name)
        try:
            m = read_manifest(snap.dir)
            return snap, m, VmSpec.model_validate(m.get("spec"))
        except ConfigError as e:
            raise Invalid(str(e)) from None
        except ValidationError as e:
            raise Invalid(f"snapshot {name}: invalid spec: {e.errors()[0]['msg']}") from None

    def _restore(self, name: str, names: list[str], clone: bool) -> list[str]:
        from pyvirt.host.models import NAME_RE, NAME_RULE
        snap, m, spec = self._open_snapshot(name)
        for n in names:
            if not re.fullmatch(NAME_RE, n):
                raise Invalid(f"VM name {n[:80]!r}: {NAME_RULE}")
        if clone and len(names) > 1 and any(net.ports for net in spec.nets):
            raise Invalid(f"snapshot {name} forwards host ports: only one VM can have them, "
                                    "clone with count 1")
        made: list[tuple[VmRecord, list[str]]] = []
        with self.lock:
            taken = [n for n in names if self.store.get(n) is not None]
            if taken:
                raise Conflict(f"a VM named {taken[0]} exists already")
            for n in names:
                rec, macs = self._restored_record(snap, m, spec, n, clone)
                self.store.add(rec)
                made.append((rec, macs))
            # (config.json's "spec" is the record's: the restored spec)
            procs = [self.runners.spawn(rec, extra={"restore": snap.dir}) for rec, _ in made]
        try:
            for rec, proc in zip([rec for rec, _ in made], procs):
                self.runners.wait_ready(rec, proc)
            # The guest agent (vsock) sets the clock, host name and (a clone's) MACs and
            # mounts the shares again; a guest without it gets its clone identity through
            # the console-port agent, as before the vsock agent.
            silent = set(after_restore([Restored(self.runners.paths(rec).vsock_sock, rec.name,
                                                 macs if clone else [], bool(spec.shares))
                                        for rec, macs in made]))
            for rec, macs in made:
                if clone and rec.name in silent:
                    self.runners.call(rec, control.Hostname(name=rec.name), control.Done)
                    for i, mac in enumerate(macs):
                        self.runners.call(rec, control.Mac(iface=f"eth{i}", address=mac), control.Done)
        except BaseException:
            for rec, _ in made:                 # all or nothing
                if self.runners.get(rec.id).alive:
                    self.runners.force_end(self.runners.get(rec.id))
                with self.lock:
                    self.store.delete(rec.id)
                shutil.rmtree(self.runners.paths(rec).dir, ignore_errors=True)
            raise
        log.info("%s snapshot %s as VM(s) %s", "cloned" if clone else "restored", name,
                 ", ".join(rec.name for rec, _ in made))
        return [rec.id for rec, _ in made]

    def _restored_record(self, snap: SnapshotRecord, m: dict[str, Any], spec: VmSpec, name: str,
                         clone: bool) -> tuple[VmRecord, list[str]]:
        """A VM record for a VM made from the snapshot, whose spec is the restored spec (its
        runner restores into exactly that spec: computed once, here), and its MACs."""
        from pyvirt.host.models import VMM_OVERHEAD, Limits
        from pyvirt.vmm.snapshot import Overrides, restored_spec
        vm_id = uuid.uuid4().hex[:12]
        vm_dir = vm_paths(self.state, vm_id).dir
        ports: dict[str, str | Path] = {
            p.name: vm_dir / ("agent.sock" if p.name == AGENT_PORT else f"port-{p.name}.sock") for p in spec.ports}
        macs = [random_mac() if clone else net.mac for net in spec.nets]
        try:
            new = restored_spec(Path(snap.dir), m, spec,
                                Overrides(macs=macs, ports=ports, vsock=vm_dir / "vsock.sock"), vm_dir / "disks")
        except ConfigError as e:
            raise Invalid(str(e)) from None
        limits = Limits(memory_limit=spec.memory + VMM_OVERHEAD)
        rec = VmRecord(id=vm_id, name=name, spec=new.model_dump_json(), limits=limits.model_dump_json(),
                       desired="running", created=time.time(), origin=snap.name)
        return rec, [str(mac) for mac in macs]
