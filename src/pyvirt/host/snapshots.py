"""pyvirtd's snapshots: take them of running VMs, restore and clone VMs from them.

Snapshots live in <state>/snapshots/<name>/ (vmm/snapshot.py's format) and in
the store's `snapshots` table.  `SnapshotOps` is mixed into the Manager:

* take: the runner is asked (control request `snapshot`, then="continue") to
  save the VM between slices; the VM goes on writing its disks through new
  overlays in its own directory (<vm dir>/disks/<random>/), which its record's
  spec then names.
* restore / clone: a new VM record (origin = the snapshot) whose runner is
  started with "restore" in its config.json: its RAM is the snapshot's `ram`
  mapped copy-on-write, its disks are overlays of its own
  (<vm dir>/disks/diskN.qcow2) over the snapshot's, its virtio-console port
  sockets are in its own directory.  A clone also gets a new random MAC per
  NIC and its own host name (sent through the guest agent right after the
  restore).  Started again after it stops, such a VM boots afresh from its
  spec (its overlays).
* delete: refused while a VM made from the snapshot exists (its disks back
  onto the snapshot's files); a VM is not deleted while a snapshot's frozen
  disk image lies in its directory.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from pyvirt.errors import ConfigError
from pyvirt.guestcmd import AGENT_PORT
from pyvirt.host import control
from pyvirt.host.agent import after_restore
from pyvirt.host.errors import Conflict, HostError, Invalid, NotFound
from pyvirt.host.paths import vm_paths
from pyvirt.host.store import DuplicateName, SnapshotRecord, VmRecord
from pyvirt.spec import DiskSpec, PortSpec, VmSpec, random_mac
from pyvirt.vmm.snapfiles import overlay_name

log = logging.getLogger("pyvirtd")

if TYPE_CHECKING:
    from pyvirt.host.manager import Manager

SNAPSHOT_TIMEOUT = 600.0        # writing a snapshot (RAM is scanned, non-zero pages written)
MAX_CLONES = 32


_ERRORS: dict[str, type[HostError]] = {"NotFound": NotFound, "Conflict": Conflict, "Invalid": Invalid}


def _error(kind: Literal["NotFound", "Conflict", "Invalid"], message: str) -> HostError:
    return _ERRORS[kind](message)


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk for the files under `path` (sparse holes do not count)."""
    return sum(f.lstat().st_blocks * 512 for f in path.rglob("*") if f.is_file() and not f.is_symlink())


class SnapshotOps:
    """Snapshot operations of the Manager (which provides state, store, snapshots, lock,
    snapshot_locks and the VM life-cycle helpers)."""

    def _snapshot(self: Manager, name: str) -> SnapshotRecord:
        snap = self.snapshots.get(name)
        if snap is None:
            raise _error("NotFound", f"no snapshot named {name}")
        return snap

    def describe_snapshot(self: Manager, snap: SnapshotRecord) -> dict[str, Any]:
        users = [r.name for r in self.store.all() if r.origin == snap.name]
        return {**snap.describe(), "used_by": users}

    def list_snapshots(self: Manager) -> list[dict[str, Any]]:
        return [self.describe_snapshot(s) for s in self.snapshots.all()]

    def get_snapshot(self: Manager, name: str) -> dict[str, Any]:
        return self.describe_snapshot(self._snapshot(name))

    # -- taking ----------------------------------------------------------------------------
    def take_snapshot(self: Manager, vm_name: str, name: str) -> dict[str, Any]:
        """Snapshot a running or paused VM; it goes on (a paused one stays paused)."""
        rec = self._running(vm_name)
        if self.snapshots.get(name) is not None:
            raise _error("Conflict", f"a snapshot named {name} exists already")
        d = self.state / "snapshots" / name
        d.parent.mkdir(mode=0o700, exist_ok=True)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise _error("Conflict", f"a snapshot named {name} exists already (or is being taken)") from None
        try:
            live = self.paths(rec).dir / "disks" / uuid.uuid4().hex[:8]
            with self.lock:
                lock = self.snapshot_locks.setdefault(rec.id, threading.Lock())
            with lock:
                try:
                    self._control(rec, "snapshot", dir=str(d), then="continue", live_dir=str(live))
                    outcome = self._snapshot_outcome(rec, d)
                finally:
                    with self.lock:            # the VM may write to new overlays now: record them
                        self._sync_disks(rec)
            if not outcome.get("ok"):
                raise _error("Conflict", f"the snapshot of VM {rec.name} failed: {outcome.get('error')}")
            from pyvirt.vmm.snapshot import read_manifest
            m = read_manifest(d)
            frozen = {i: disk["path"] for i, disk in enumerate(m["disks"]) if disk.get("kind") == "frozen"}
            snap = SnapshotRecord(name=name, vm=rec.name, vm_id=rec.id, dir=str(d), created=time.time(),
                                  memory=m["memory"], size=disk_usage(d), version=m["version"],
                                  frozen=json.dumps(list(frozen.values())))
            try:
                self.snapshots.add(snap)
            except DuplicateName:
                raise _error("Conflict", f"a snapshot named {name} exists already") from None
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        log.info("snapshot %s of VM %s taken into %s", name, vm_name, d)
        return self.describe_snapshot(snap)

    def _snapshot_outcome(self: Manager, rec: VmRecord, d: Path) -> dict[str, Any]:
        """Wait until the runner reports the snapshot into `d` done (or failed).  A runner
        busy writing it does not answer: that is waited for as long as the runner lives."""
        deadline = time.monotonic() + SNAPSHOT_TIMEOUT
        while time.monotonic() < deadline:
            try:
                st = control.request(self.paths(rec).control_sock, "status", timeout=5)
            except control.ControlError as e:
                with self.lock:
                    self._check(self._get(rec.id))
                    alive = self._get(rec.id).alive
                if alive:
                    time.sleep(0.1)
                    continue
                raise _error("Conflict", f"VM {rec.name} ended during its snapshot ({e})") from None
            snap = st.get("snapshot") or {}
            if snap.get("dir") == str(d) and snap.get("ok") is not None:
                return snap
            time.sleep(0.02)
        raise _error("Conflict", f"the snapshot of VM {rec.name} did not finish in {SNAPSHOT_TIMEOUT:.0f} s")

    def _sync_disks(self: Manager, rec: VmRecord) -> None:
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

    # -- deleting --------------------------------------------------------------------------
    def delete_snapshot(self: Manager, name: str) -> None:
        with self.lock:
            snap = self._snapshot(name)
            users = [r.name for r in self.store.all() if r.origin == name]
            if users:
                raise _error("Conflict", f"snapshot {name} is used by VM(s) {', '.join(users)} (made from it): "
                                         "delete them first")
            self.snapshots.delete(name)
        shutil.rmtree(snap.dir, ignore_errors=True)
        log.info("deleted snapshot %s", name)

    def check_no_snapshot_needs(self: Manager, rec: VmRecord) -> None:
        """Refuse to delete `rec` while a snapshot's disks back onto an image in its directory."""
        vm_dir = self.paths(rec).dir.resolve()          # (both resolved: a symlink in the state
        for snap in self.snapshots.all():               # directory's path must not hide one)
            for path in json.loads(snap.frozen):
                if Path(path).resolve().is_relative_to(vm_dir):
                    raise _error("Conflict", f"snapshot {snap.name} is built on VM {rec.name}'s disk "
                                             f"{Path(path).name}: delete the snapshot first")

    # -- restoring and cloning -------------------------------------------------------------
    def restore_snapshot(self: Manager, name: str, vm_name: str | None = None) -> dict[str, Any]:
        """A new VM that goes on exactly where the snapshot was taken (same MACs, host name)."""
        return self._restore(name, [vm_name or f"{name}-{uuid.uuid4().hex[:6]}"], clone=False)[0]

    def clone_snapshot(self: Manager, name: str, count: int, prefix: str | None = None) -> list[dict[str, Any]]:
        """`count` VMs from the snapshot, named PREFIX-1..PREFIX-count, each with its own disks,
        MACs, port sockets and host name."""
        if not 1 <= count <= MAX_CLONES:
            raise _error("Invalid", f"count must be 1 to {MAX_CLONES}, not {count}")
        return self._restore(name, [f"{prefix or name}-{i}" for i in range(1, count + 1)], clone=True)

    def _open_snapshot(self: Manager, name: str) -> tuple[SnapshotRecord, dict[str, Any], VmSpec]:
        from pyvirt.vmm.snapshot import read_manifest
        snap = self._snapshot(name)
        try:
            m = read_manifest(snap.dir)
            return snap, m, VmSpec.model_validate(m.get("spec"))
        except ConfigError as e:
            raise _error("Invalid", str(e)) from None
        except ValidationError as e:
            raise _error("Invalid", f"snapshot {name}: invalid spec: {e.errors()[0]['msg']}") from None

    def _restore(self: Manager, name: str, names: list[str], clone: bool) -> list[dict[str, Any]]:
        from pyvirt.host.models import NAME_RE, NAME_RULE
        snap, m, spec = self._open_snapshot(name)
        for n in names:
            if not re.fullmatch(NAME_RE, n):
                raise _error("Invalid", f"VM name {n[:80]!r}: {NAME_RULE}")
        if clone and len(names) > 1 and any(net.ports for net in spec.nets):
            raise _error("Invalid", f"snapshot {name} forwards host ports: only one VM can have them, "
                                    "clone with count 1")
        made: list[tuple[VmRecord, dict[str, Any]]] = []
        with self.lock:
            taken = [n for n in names if self.store.get(n) is not None]
            if taken:
                raise _error("Conflict", f"a VM named {taken[0]} exists already")
            for n in names:
                rec, overrides = self._restored_record(snap, m, spec, n, clone)
                self.store.add(rec)
                made.append((rec, overrides))
            procs = [self._spawn(rec, extra={"restore": snap.dir, "overrides": ov}) for rec, ov in made]
        try:
            for (rec, ov), proc in zip(made, procs):
                self._wait_ready(rec, proc)
                if clone:                       # the guest agent takes on the clone's identity
                    self._control(rec, "hostname", name=rec.name)
                    for i, mac in enumerate(ov["macs"]):
                        self._control(rec, "mac", iface=f"eth{i}", address=mac)
            after_restore([(self.paths(rec).vsock_sock, rec.name) for rec, _ in made])
        except BaseException:
            for rec, _ in made:                 # all or nothing
                if self._get(rec.id).alive:
                    self._force_end(self._get(rec.id))
                with self.lock:
                    self.store.delete(rec.id)
                shutil.rmtree(self.paths(rec).dir, ignore_errors=True)
            raise
        log.info("%s snapshot %s as VM(s) %s", "cloned" if clone else "restored", name,
                 ", ".join(rec.name for rec, _ in made))
        return [self.inspect(rec.id) for rec, _ in made]

    def _restored_record(self: Manager, snap: SnapshotRecord, m: dict[str, Any], spec: VmSpec, name: str,
                         clone: bool) -> tuple[VmRecord, dict[str, Any]]:
        """A VM record for a VM made from the snapshot, and its runner's restore overrides."""
        from pyvirt.host.models import VMM_OVERHEAD, Limits
        vm_id = uuid.uuid4().hex[:12]
        vm_dir = vm_paths(self.state, vm_id).dir
        overlays = vm_dir / "disks"
        ports = {p.name: str(vm_dir / ("agent.sock" if p.name == AGENT_PORT else f"port-{p.name}.sock"))
                 for p in spec.ports}
        macs = [random_mac() if clone else net.mac for net in spec.nets]
        disks = [DiskSpec(path=overlays / overlay_name(i), format="qcow2") if saved.get("kind") == "frozen"
                 else disk for i, (saved, disk) in enumerate(zip(m["disks"], spec.disks))]
        new = spec.model_copy(update={
            "disks": disks, "ports": [PortSpec(name=n, socket=Path(s)) for n, s in ports.items()],
            "nets": [net.model_copy(update={"mac": mac}) for net, mac in zip(spec.nets, macs)]})
        limits = Limits(memory_limit=spec.memory + VMM_OVERHEAD)
        rec = VmRecord(id=vm_id, name=name, spec=new.model_dump_json(), limits=limits.model_dump_json(),
                       desired="running", created=time.time(), origin=snap.name)
        return rec, {"overlay_dir": str(overlays), "ports": ports, "macs": macs}
