"""Restoring a snapshot: a new Vm in the state a snapshot directory saved.

Apart from vmm/snapshot.py (the format, saving, reading and checking the manifest) because it
builds a `Vm`, and `Vm` serves snapshot requests with `save_snapshot`: one module each way keeps
the import graph free of cycles."""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pyvirt.backends.char import CharBackend
from pyvirt.errors import ConfigError, ImageError, PyvirtError
from pyvirt.spec import NetSpec, PortSpec, VmSpec
from pyvirt.vmm.resources import build_board
from pyvirt.vmm.snapcheck import check_state
from pyvirt.vmm.snapshot import (
    RAM,
    STATE,
    Overrides,
    _parse_json,
    overlay_name,
    ram_file_size,
    read_manifest,
)
from pyvirt.vmm.vm import Vm

__all__ = ["Overrides", "load_snapshot"]


def load_snapshot(directory: str | Path, console: CharBackend, *,
                  overrides: Overrides | None = None) -> Vm:
    """A new, not yet running Vm in the state the snapshot at `directory` saved.

    Every problem with the snapshot (or the host files it needs) is one ConfigError or
    ImageError line.  Host-side backends (network, console ports) are made afresh from
    the spec; the caller's `console` serves the UART."""
    d = Path(directory).resolve()
    m = read_manifest(d)
    try:
        spec = VmSpec.model_validate(m.get("spec"))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise ConfigError(f"snapshot {d}: invalid spec: {where}: {err['msg']}") from None
    if m["memory"] != spec.memory or m["files"][RAM]["size"] != ram_file_size(spec.memory):
        raise ConfigError(f"snapshot {d}: RAM size does not match the spec's {spec.memory} bytes")
    if len(m["disks"]) != len(spec.disks):
        raise ConfigError(f"snapshot {d}: {len(m['disks'])} disks recorded, the spec has {len(spec.disks)}")
    raw = (d / STATE).read_bytes()
    state = _parse_json(raw, f"snapshot {d}: {STATE}")
    spec, cleanup = _restored_spec(d, m, spec, overrides or Overrides())
    ram = _map_ram(d / RAM, ram_file_size(spec.memory))
    board = None
    try:
        board = build_board(spec, console, ram=ram, restore=True)
        checked = check_state(board, state)
        try:
            board.load_state(checked)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ConfigError(f"snapshot {d}: state does not fit the machine: {e}") from None
        vm = Vm(spec, console, board=board)
    except BaseException as e:
        if board is not None:
            board.close()
        cleanup()
        if isinstance(e, PyvirtError) and not isinstance(e, (ConfigError, ImageError)):
            raise ConfigError(str(e)) from None
        raise
    vm.on_close.append(cleanup)
    return vm


def _map_ram(path: Path, size: int) -> mmap.mmap:
    """The RAM file, private and writable: the guest's writes are copies, never the file's."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"snapshot: cannot open {path}: {e.strerror}") from None
    try:
        if os.fstat(fd).st_size != size:
            raise ConfigError(f"snapshot: {path} is not {size} bytes")
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _restored_spec(d: Path, m: dict[str, Any], spec: VmSpec, ov: Overrides) -> tuple[VmSpec, Any]:
    """The spec a restored VM runs with: its own disk overlays, overridden NICs."""
    from pyvirt.backends.qcow2_tools import create_qcow2
    nets = list(spec.nets)
    if ov.nets is not None:
        if len(ov.nets) != len(nets):
            raise ConfigError(f"the snapshot has {len(nets)} network interfaces, "
                              f"the overrides give {len(ov.nets)}")
        nets = list(ov.nets)
    if ov.macs is not None:
        if len(ov.macs) != len(nets):
            raise ConfigError(f"the snapshot has {len(nets)} network interfaces, "
                              f"the overrides give {len(ov.macs)} MAC addresses")
        try:
            nets = [NetSpec.model_validate(dict(n.model_dump(), mac=mac)) for n, mac in zip(nets, ov.macs)]
        except ValidationError as e:
            raise ConfigError(f"MAC override: {e.errors()[0]['msg'].removeprefix('Value error, ')}") \
                from None
    ports = list(spec.ports)
    if ov.ports is not None:
        unknown = sorted(set(ov.ports) - {p.name for p in ports})
        if unknown:
            raise ConfigError(f"port override: the snapshot has no port named {unknown[0]!r}")
        ports = [PortSpec(name=p.name, socket=Path(ov.ports.get(p.name, p.socket))) for p in ports]
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if any(disk.get("kind") == "frozen" for disk in m["disks"] if isinstance(disk, dict)):
        if ov.overlay_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="pyvirt-restore-")
            where = Path(tmp.name)
        else:
            where = Path(ov.overlay_dir)
            where.mkdir(parents=True, exist_ok=True)

    def cleanup() -> None:
        if tmp is not None:
            tmp.cleanup()

    disks = []
    try:
        for i, (saved, disk) in enumerate(zip(m["disks"], spec.disks)):
            kind = saved.get("kind") if isinstance(saved, dict) else None
            if kind == "shared" and disk.read_only:
                disks.append(disk)
            elif kind == "frozen" and not disk.read_only and overlay_name(i) in m["files"]:
                overlay = where / overlay_name(i)
                create_qcow2(overlay, None, backing=d / overlay_name(i), backing_format="qcow2")
                disks.append(disk.model_copy(update={"path": overlay, "format": "qcow2"}))
            else:
                raise ConfigError(f"snapshot {d}: disk {i} is recorded inconsistently")
    except BaseException:
        cleanup()
        raise
    update: dict[str, Any] = {"disks": disks, "nets": nets, "ports": ports}
    if ov.engine is not None:
        update["engine"] = ov.engine
    try:
        new = VmSpec.model_validate(dict(spec.model_dump(), **update))
    except ValidationError as e:
        cleanup()
        raise ConfigError(f"restore overrides: {e.errors()[0]['msg']}") from None
    return new, cleanup


