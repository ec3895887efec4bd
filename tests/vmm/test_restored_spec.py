"""The restored spec is computed once (issue 13): `snapshot.restored_spec` gives the spec a VM
made from a snapshot runs with (the daemon keeps it as the VM's record), and `load_snapshot(...,
spec=...)` restores into exactly that spec -- its overlays where it says, its engine -- after
checking it is the snapshot's machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.errors import ConfigError
from pyvirt.spec import DiskSpec, VmSpec, make_spec
from pyvirt.vmm.restore import load_snapshot
from pyvirt.vmm.snapshot import Overrides, read_manifest, restored_spec, save_snapshot
from pyvirt.vmm.vm import Vm


def test_a_vm_restores_into_the_spec_computed_for_it(program: Path, tmp_path: Path) -> None:
    disk = tmp_path / "own" / "disk.raw"
    disk.parent.mkdir()
    disk.write_bytes(bytes(1 << 20))
    spec = make_spec(bios=str(program), memory=16 << 20, engine="interp", disks=[DiskSpec(path=disk, format="raw")])
    first = Vm(spec, BufferBackend())
    assert first.run(max_instructions=50_000) is None
    save_snapshot(first, tmp_path / "snap", then="quit", own_dir=tmp_path / "own")
    first.close()

    d = tmp_path / "snap"
    m = read_manifest(d)
    saved = VmSpec.model_validate(m["spec"])
    where = tmp_path / "vm" / "disks"
    new = restored_spec(d, m, saved, Overrides(engine="jit"), where)
    assert new.disks[0].path == where / "disk0.qcow2" and not (where / "disk0.qcow2").exists()  # nothing made yet

    vm = load_snapshot(d, BufferBackend(), spec=new)
    try:
        assert vm.spec == new and vm.spec.engine == "jit"
        assert (where / "disk0.qcow2").is_file()                           # the overlay where the spec says
        assert vm.run(max_instructions=50_000_000) == 0
    finally:
        vm.close()

    with pytest.raises(ConfigError, match="not the snapshot's machine"):
        load_snapshot(d, BufferBackend(), spec=new.model_copy(update={"cpus": 2}))
    with pytest.raises(ValueError, match="not both"):
        load_snapshot(d, BufferBackend(), spec=new, overrides=Overrides())
