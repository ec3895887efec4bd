"""Snapshots taken by an earlier pyvirt (issue 13): the code before the architecture step
(main at BASE) writes a snapshot of a bare-metal program with a disk and a console port; this
tree restores it and the program ends exactly as an uninterrupted run does -- the format
version (1) is the same, so it must restore -- and the same snapshot under another version
number is refused in one line, never misread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.errors import ConfigError
from pyvirt.spec import DiskSpec, PortSpec, make_spec
from pyvirt.testing import asm
from pyvirt.vmm.restore import load_snapshot
from pyvirt.vmm.snapshot import VERSION
from pyvirt.vmm.vm import Vm

BASE = "09eb2a3"            # main before issue 13's daemon split, board reset and device table
REPO = Path(__file__).resolve().parents[2]

SAVE = """
import sys
from pathlib import Path
from pyvirt.backends.char import BufferBackend
from pyvirt.spec import DiskSpec, PortSpec, make_spec
from pyvirt.vmm.snapshot import save_snapshot
from pyvirt.vmm.vm import Vm
elf, disk, sock, out = sys.argv[1:5]
spec = make_spec(bios=elf, memory=16 << 20, engine="interp", disks=[DiskSpec(path=disk, format="raw")],
                 ports=[PortSpec(name="org.test", socket=Path(sock))])
vm = Vm(spec, BufferBackend())
assert vm.run(max_instructions=100_000) is None
save_snapshot(vm, out, then="quit")
vm.close()
"""


@pytest.fixture(scope="module")
def base_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BASE's src/ (from this repository's history)."""
    out = tmp_path_factory.mktemp("base")
    p = subprocess.run(["git", "-C", str(REPO), "archive", BASE, "src"], capture_output=True)
    if p.returncode != 0:
        pytest.fail(f"cannot read {BASE} from the repository's history: {p.stderr.decode()[:200]}")
    tar = out / "src.tar"
    tar.write_bytes(p.stdout)
    with tarfile.open(tar) as t:
        t.extractall(out, filter="data")
    return out / "src"


def spec_for(elf: Path, disk: Path, sock: Path) -> Any:
    return make_spec(bios=str(elf), memory=16 << 20, engine="interp", disks=[DiskSpec(path=disk, format="raw")],
                     ports=[PortSpec(name="org.test", socket=sock)])


def final(vm: Vm, elf: Path) -> tuple[Any, ...]:
    h = vm.board.harts[0]
    res = asm.symbols(elf)["result"]
    return (list(h.x), list(h.f), h.instret, h.pc, vm.board.bus.read_bytes(res, 32))


def test_a_snapshot_of_the_code_before_restores_or_is_refused_by_version(
        program: Path, base_src: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"D" * (1 << 20))
    whole = Vm(spec_for(program, disk, tmp_path / "w.sock"), BufferBackend())
    assert whole.run(max_instructions=50_000_000) == 0
    want = final(whole, program)
    whole.close()

    snap = tmp_path / "snap"
    r = subprocess.run([sys.executable, "-c", SAVE, str(program), str(disk), str(tmp_path / "old.sock"), str(snap)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(base_src)), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["version"] == VERSION == 1            # the format did not change: it restores

    vm = load_snapshot(snap, BufferBackend())
    try:
        assert 0 < vm.board.harts[0].instret < want[2]
        assert vm.run(max_instructions=50_000_000) == 0
        assert final(vm, program) == want
    finally:
        vm.close()

    manifest["version"] = VERSION + 1                     # a format this pyvirt does not read
    (snap / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=f"version {VERSION + 1} is not supported") as e:
        load_snapshot(snap, BufferBackend())
    assert "\n" not in str(e.value)
