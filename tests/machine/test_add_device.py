"""Adding a virtio device with a host backend touches its device file, its backend, a row in
machine/virtio_table.py and its VmSpec field (docs/devices.md, "Adding a virtio device").

Here a toy device is added from this file alone, through the same extension points: a device
class, a backend, a table row (`virtio_table.register`) and its spec field with its Flag
(`spec.add_device_field`, what a `VmSpec` field declared in spec.py is).  Nothing in
request.py, spec.py, the board, the VMM or the API names it, yet it reaches the spec, the
`pyvirt run`/`pyvirt create` flags, the request and REST API models, the VMM's opening of
backends, the device tree, the board's host-I/O polling and a snapshot's save and restore."""

from __future__ import annotations

import contextlib
import io
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from pydantic import BaseModel, ConfigDict

from pyvirt import request
from pyvirt.backends.char import BufferBackend
from pyvirt.clock import Clock
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.queue import SplitQueue
from pyvirt.errors import ConfigError
from pyvirt.machine import virtio_table
from pyvirt.machine.riscv_virt import VIRTIO_BASE
from pyvirt.spec import Flag, VmSpec, add_device_field, make_spec, remove_device_field
from pyvirt.state import Schema, integer, record
from pyvirt.vmm.restore import load_snapshot
from pyvirt.vmm.snapshot import save_snapshot
from pyvirt.vmm.vm import Vm

TOY_ID = 42  # no device of the board's has it
MAGIC, DEVICE_ID = 0x000, 0x008  # virtio-mmio registers (virtio 1.2, 4.2.2)


# -- the device file ------------------------------------------------------------------------------
class ToyBackend:
    """The host side: a file on the host the device appends what the guest sends to."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "ab")  # noqa: SIM115  (the board closes it, through close())

    def close(self) -> None:
        self.file.close()


class VirtioToy(VirtioDevice):
    device_id = TOY_ID
    num_queues = 1
    serves_host = True  # the board polls it between slices

    def __init__(self, backend: ToyBackend, level: int) -> None:
        super().__init__()
        self.backend, self.level = backend, level
        self.polls = 0
        self.sent = 0  # bytes the guest has sent: saved in a snapshot

    def process(self, index: int, queue: SplitQueue) -> None:
        while (chain := queue.pop()) is not None:
            data = queue.gather(chain.readable, 4096)
            self.backend.file.write(data)
            self.sent += len(data)
            queue.push(chain.head, 0)

    def poll(self) -> None:
        self.polls += 1

    def device_state_schema(self) -> Schema:
        return record({"sent": integer(0, 1 << 62)})

    def save_device(self) -> dict[str, Any]:
        return {"sent": self.sent}

    def load_device(self, state: dict[str, Any]) -> None:
        self.sent = state["sent"]


# -- its spec model and flag (what spec.py would declare) ------------------------------------------
class ToySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path
    level: int = 1

    @classmethod
    def parse(cls, text: str) -> ToySpec:
        path, _, level = text.partition(",level=")
        return cls(path=Path(path), **({"level": level} if level else {}))  # type: ignore[arg-type]


TOY_FLAG = Flag(
    ("--toy",),
    "a toy virtio device writing to the host file PATH",
    "PATH: a toy virtio device writing to this host file (as --toy)",
    ToySpec.parse,
    metavar="PATH",
    path="file",
)


# -- its table row -------------------------------------------------------------------------------
def _open_toy(spec: VmSpec, _i: int) -> ToyBackend:
    return ToyBackend(spec.toy.path)  # type: ignore[attr-defined]


def _make_toy(_clock: Clock, spec: VmSpec, _i: int, backend: ToyBackend) -> VirtioDevice:
    return VirtioToy(backend, spec.toy.level)  # type: ignore[attr-defined]


TOY_ROW = virtio_table.VirtioKind(
    "toy", lambda s: int(getattr(s, "toy", None) is not None), _make_toy, _open_toy
)


@pytest.fixture
def toy() -> Iterator[None]:
    add_device_field("toy", Optional[ToySpec], TOY_FLAG)
    unregister = virtio_table.register(TOY_ROW)
    try:
        yield
    finally:
        unregister()
        remove_device_field("toy")


def _bios(tmp_path: Path) -> Path:
    """Firmware of one instruction, `j .`, loaded at RAM's start."""
    code = struct.pack("<I", 0x0000006F)
    fields = (2, 243, 1, 0x8000_0000, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), *fields)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 120, 0x8000_0000, 0x8000_0000, len(code), len(code), 0x1000)
    path = tmp_path / "fw.elf"
    path.write_bytes(ehdr + phdr + code)
    return path


def _help(verb: str) -> str:
    from pyvirt.cli import _parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        _parser().parse_args([verb, "--help"])
    return out.getvalue()


# -- the tests ------------------------------------------------------------------------------------
def test_the_spec_takes_the_new_field_and_only_while_it_is_added(toy: None, tmp_path: Path) -> None:
    spec = make_spec(toy={"path": tmp_path / "out", "level": 2})
    assert spec.toy == ToySpec(path=tmp_path / "out", level=2)  # type: ignore[attr-defined]
    assert make_spec().toy is None  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"--toy: at least|--toy: .*valid integer"):
        make_spec(toy={"path": tmp_path / "out", "level": "x"})
    loaded = VmSpec.model_validate_json(spec.model_dump_json())
    assert loaded == spec


def test_without_it_nothing_knows_the_toy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'toy'"):
        make_spec(toy={"path": tmp_path / "out"})
    assert "toy" not in request.VmRequest.model_fields and "--toy" not in _help("run")
    assert all(k.name != "toy" for k in virtio_table.VIRTIO_KINDS)


def test_the_flag_of_run_and_create_resolves_to_the_spec(
    toy: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyvirt.cli import _parser

    fw = _bios(tmp_path)
    for verb in ("run", "create"):
        text = _help(verb)
        assert "--toy PATH" in text and "a toy virtio device writing to the host file PATH" in text
    monkeypatch.chdir(tmp_path)
    args = _parser().parse_args(["run", "--bios", str(fw), "--toy", "out"])
    req = request.from_args(args, request.RUN)
    assert req.toy == "out"  # type: ignore[attr-defined]
    spec = request.resolve(req).spec
    assert spec.toy == ToySpec(path=Path("out"))  # type: ignore[attr-defined]
    # pyvirt create: the path is made absolute (the daemon runs elsewhere), as --kernel's is
    args = _parser().parse_args(["create", "vm1", "--bios", str(fw), "--toy", "out"])
    assert request.from_args(args, request.CREATE, absolute=True).toy == str(tmp_path / "out")  # type: ignore[attr-defined]
    # unset: the spec's default (no device), as for --vsock
    assert request.resolve(request.VmRequest(bios=str(fw))).spec.toy is None  # type: ignore[attr-defined]


def test_the_rest_api_model_and_its_schema_have_it(toy: None, tmp_path: Path) -> None:
    from pyvirt.host.api import make_app
    from pyvirt.host.models import VmCreate, to_spec

    fw = _bios(tmp_path)
    schema = make_app(None).openapi()["components"]["schemas"]["VmCreate"]  # type: ignore[arg-type]
    assert schema["properties"]["toy"]["description"] == TOY_FLAG.description
    req = VmCreate.model_validate({"name": "vm1", "bios": str(fw), "toy": str(tmp_path / "out")})
    spec, _limits = to_spec(req)
    assert spec.toy == ToySpec(path=tmp_path / "out")  # type: ignore[attr-defined]
    # the Client sends what a VmRequest dumps
    assert request.VmRequest(toy="p").model_dump(exclude_defaults=True) == {"toy": "p"}


def test_the_board_opens_builds_polls_and_describes_it(toy: None, tmp_path: Path) -> None:
    fw, out = _bios(tmp_path), tmp_path / "out"
    plain = Vm(make_spec(bios=str(fw), memory=16 << 20), BufferBackend())
    plain_nodes = [n.name for n in plain.board.device_tree("", None).find("soc").children]  # type: ignore[union-attr]
    plain.close()
    vm = Vm(make_spec(bios=str(fw), memory=16 << 20, toy={"path": out, "level": 3}), BufferBackend())
    try:
        board = vm.board
        toys = [t.device for _, _, t in board.virtio if isinstance(t.device, VirtioToy)]
        assert len(toys) == 1 and toys[0].level == 3 and out.exists()  # the VMM opened its host side
        base = VIRTIO_BASE + 0x1000 * (len(board.virtio) - 1)  # after the other rows' slots
        assert board.bus.read(base + MAGIC, 4) == 0x74726976 and board.bus.read(base + DEVICE_ID, 4) == TOY_ID
        nodes = [n.name for n in board.device_tree("", None).find("soc").children]  # type: ignore[union-attr]
        assert sorted(set(nodes) - set(plain_nodes)) == [f"virtio_mmio@{base:x}"]
        assert vm.run(max_instructions=50_000) is None and toys[0].polls > 0  # polled between slices
        backend = toys[0].backend
    finally:
        vm.close()
    assert backend.file.closed  # the board closed it


def test_a_snapshot_saves_and_restores_it(toy: None, tmp_path: Path) -> None:
    fw, out = _bios(tmp_path), tmp_path / "out"
    vm = Vm(make_spec(bios=str(fw), memory=16 << 20, toy={"path": out}), BufferBackend())
    vm.run(max_instructions=20_000)
    toy_dev = next(t.device for _, _, t in vm.board.virtio if isinstance(t.device, VirtioToy))
    toy_dev.sent = 1234
    manifest = save_snapshot(vm, tmp_path / "snap", then="quit")
    vm.close()
    assert manifest["spec"]["toy"] == {"path": str(out), "level": 1}
    restored = load_snapshot(tmp_path / "snap", BufferBackend())
    try:
        again = next(t.device for _, _, t in restored.board.virtio if isinstance(t.device, VirtioToy))
        assert again.sent == 1234 and not again.backend.file.closed  # its state, a fresh host side
        assert restored.spec.toy == ToySpec(path=out)  # type: ignore[attr-defined]
    finally:
        restored.close()


def test_request_py_names_no_device_field() -> None:
    """The board's own device fields (vsock) come to request.py from their Flags too."""
    from pyvirt.spec import device_flags

    source = Path(request.__file__).read_text()
    assert "vsock" in device_flags()
    assert [name for name in device_flags() if re.search(rf"\b{name}\b", source)] == []


def test_a_bad_value_is_one_line_in_the_flags_words(toy: None, tmp_path: Path) -> None:
    fw = _bios(tmp_path)
    with pytest.raises(ConfigError) as e:
        request.resolve(request.VmRequest(bios=str(fw), toy="out,level=high"))  # type: ignore[call-arg]
    assert str(e.value).startswith("--toy out,level=high: ") and "\n" not in str(e.value)


def test_a_repeated_flag_gives_a_list(tmp_path: Path) -> None:
    from pyvirt.cli import _parser

    flag = Flag(
        ("--toys",), "toys (repeatable)", "toys (as --toys)", ToySpec.parse, metavar="PATH", repeated=True
    )
    add_device_field("toys", list[ToySpec], flag, default=[])
    try:
        args = _parser().parse_args(
            ["run", "--bios", str(_bios(tmp_path)), "--toys", "a", "--toys", "b,level=2"]
        )
        req = request.from_args(args, request.RUN)
        assert req.toys == ["a", "b,level=2"]  # type: ignore[attr-defined]
        assert request.resolve(req).spec.toys == [ToySpec(path=Path("a")), ToySpec(path=Path("b"), level=2)]  # type: ignore[attr-defined]
        assert request.resolve(request.VmRequest(bios="fw")).spec.toys == []  # type: ignore[attr-defined]
    finally:
        remove_device_field("toys")
    assert "toys" not in request.VmRequest.model_fields and "--toys" not in _help("run")
