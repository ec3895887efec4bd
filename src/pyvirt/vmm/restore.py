"""Restoring a snapshot: a new Vm in the state a snapshot directory saved.

Apart from vmm/snapshot.py (the format, saving, reading and checking the manifest) because it
builds a `Vm`, and `Vm` serves snapshot requests with `save_snapshot`: one module each way keeps
the import graph free of cycles."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from pyvirt.backends.char import CharBackend
from pyvirt.errors import ConfigError, ImageError, PyvirtError
from pyvirt.spec import VmSpec
from pyvirt.vmm.resources import build_board
from pyvirt.vmm.snapcheck import check_state
from pyvirt.vmm.snapshot import (
    RAM,
    STATE,
    Overrides,
    _parse_json,
    _restored_spec,
    check_restored,
    make_overlays,
    map_ram,
    ram_file_size,
    read_manifest,
    read_small,
)
from pyvirt.vmm.vm import Vm

__all__ = ["Overrides", "load_snapshot"]


def load_snapshot(
    directory: str | Path,
    console: CharBackend,
    *,
    overrides: Overrides | None = None,
    spec: VmSpec | None = None,
) -> Vm:
    """A new, not yet running Vm in the state the snapshot at `directory` saved.

    Its spec is `spec` when the caller computed it already (`snapshot.restored_spec`, as the
    daemon does for its record: it is checked to be the snapshot's machine and its disk
    overlays are made), else the snapshot's with `overrides` applied.

    Every problem with the snapshot (or the host files it needs) is one ConfigError or
    ImageError line.  Host-side backends (network, console ports) are made afresh from
    the spec; the caller's `console` serves the UART."""
    d = Path(directory).resolve()
    m = read_manifest(d)
    try:
        saved = VmSpec.model_validate(m.get("spec"))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise ConfigError(f"snapshot {d}: invalid spec: {where}: {err['msg']}") from None
    if spec is not None and overrides is not None:
        raise ValueError("load_snapshot: a restored spec or overrides, not both")
    spec_given = spec
    spec = saved
    if m["memory"] != spec.memory or m["files"][RAM]["size"] != ram_file_size(spec.memory):
        raise ConfigError(f"snapshot {d}: RAM size does not match the spec's {spec.memory} bytes")
    if len(m["disks"]) != len(spec.disks):
        raise ConfigError(f"snapshot {d}: {len(m['disks'])} disks recorded, the spec has {len(spec.disks)}")
    raw = read_small(d, STATE)
    state = _parse_json(raw, f"snapshot {d}: {STATE}")
    if spec_given is None:
        spec, cleanup = _restored_spec(d, m, spec, overrides or Overrides())
    else:
        check_restored(d, saved, spec_given)
        make_overlays(d, m, spec_given, fresh=True)
        spec, cleanup = spec_given, (lambda: None)
    board = None
    try:
        ram, ram_fd = map_ram(d / RAM, spec)  # (a memfd for a VM with a shared folder)
        board = build_board(spec, console, ram=ram, ram_fd=ram_fd, restore=True)
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
