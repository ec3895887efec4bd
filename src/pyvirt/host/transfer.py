"""pyvirtd's export and import: a VM (or a VM as of one of its snapshots) to an archive file,
and a new VM from one (host/archive.py writes and checks the archives)."""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from pyvirt.errors import ConfigError
from pyvirt.guestcmd import AGENT_PORT
from pyvirt.host.errors import Conflict, Invalid
from pyvirt.host.snapshots import Snapshots, disk_usage
from pyvirt.host.store import DuplicateName, SnapshotRecord, VmRecord
from pyvirt.vmm.snapfiles import overlay_name


class Transfers:
    """Export and import for the Manager; an import answers with the new VM's id (and the
    name of the snapshot it brought, if any)."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snaps = snapshots
        self.runners = snapshots.runners
        self.state = snapshots.state
        self.store = snapshots.store
        self.snapshots = snapshots.snapshots
        self.lock = snapshots.lock

    def export(self, name: str, path: str, snapshot: str | None = None) -> dict[str, Any]:
        """Write VM `name` (stopped or crashed) to the new archive `path`; or, at any state,
        the VM as of its snapshot `snapshot` together with that snapshot (state, RAM and
        its disks, which are the exported VM's)."""
        from pyvirt.host import archive
        from pyvirt.vmm.snapshot import read_manifest
        _absolute(path)
        rec = self.runners.current(name)
        spec = rec.spec_dict
        snap_export = None
        if snapshot is not None:
            snap = self.snaps._snapshot(snapshot)
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
                memory_limit: int | str | None = None, cpu_quota: float | None = None) -> tuple[str, str | None]:
        """A new, stopped VM from an export archive: checked whole before anything is kept.
        An archive with a snapshot also registers the snapshot (as a snapshot of the new VM),
        under its name in the archive or, when that is taken, NEW-NAME; else 409.

        The archive is not trusted: the VM keeps only its guest hardware and disk contents
        (archive.trusted_spec; disks are raw images, never probed); its network interfaces
        are `nets` (as --net), its host limits `memory_limit` / `cpu_quota` or the defaults
        -- never the archive's."""
        _absolute(path)
        from pyvirt.host import archive
        from pyvirt.host.models import NAME_RE, NAME_RULE, host_limits
        from pyvirt.spec import NetSpec, VmSpec
        try:
            net_specs = [json.loads(NetSpec.parse(n).model_dump_json()) for n in nets or []]
        except ConfigError as e:
            raise Invalid(str(e)) from None
        vm_id = uuid.uuid4().hex[:12]
        dest = self.runners.paths(VmRecord(id=vm_id, name="", spec="", limits="", desired="", created=0)).dir
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
        return vm_id, None if snap is None else snap.name

    def _import_snapshot_dir(self, archived: str, vm_name: str) -> Path:
        """A free path for an imported snapshot: <state>/snapshots/NAME (NAME the
        archive's), or VM-NAME when NAME is taken."""
        from pyvirt.host.models import NAME_RE
        (self.state / "snapshots").mkdir(mode=0o700, exist_ok=True)
        for n in (archived, f"{vm_name}-{archived}"):
            d = self.state / "snapshots" / n
            if re.fullmatch(NAME_RE, n) and self.snapshots.get(n) is None and not d.exists():
                return d
        raise Conflict(f"a snapshot named {archived} (and one named {vm_name}-{archived}) exists already: "
                       "import with another --name, or delete it first")

    def remove_unfinished_imports(self) -> None:
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



def _absolute(path: str) -> None:
    """Archive paths name host files for the daemon: only absolute ones (a relative path would be
    resolved against the daemon's working directory, not the caller's)."""
    if not os.path.isabs(path):
        raise Invalid(f"the archive path must be absolute, not {path!r}")
