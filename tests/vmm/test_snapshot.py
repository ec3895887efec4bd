"""Snapshots without a Linux guest: every component's state through the snapshot's
JSON and schema and back, a bare-metal program run in two halves across a snapshot
on every engine, and snapshot files that are damaged or hostile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.clock import Clock
from pyvirt.cpu.riscv import native
from pyvirt.cpu.riscv.hart import Hart
from pyvirt.devices.base import IrqLine
from pyvirt.devices.plic import Plic
from pyvirt.devices.uart16550 import Uart16550
from pyvirt.devices.virtio.rng import VirtioRng
from pyvirt.errors import ConfigError
from pyvirt.memory import Bus
from pyvirt.spec import ShareSpec, make_spec
from pyvirt.state import Schema, encode_bytes
from pyvirt.testing import asm
from pyvirt.testing.virtio_rig import make_rig
from pyvirt.vmm.restore import Overrides, load_snapshot
from pyvirt.vmm.snapshot import save_snapshot
from pyvirt.vmm.vm import Vm

ENGINES = ["interp", "jit"] + (["native"] if native.available() else [])
RAM = 0x8000_0000


def through_json(state: dict[str, Any], schema: Schema) -> Any:
    """What a snapshot does to a component's state: JSON text, then the schema."""
    return schema(json.loads(json.dumps(state, default=encode_bytes)), "")


# -- components ---------------------------------------------------------------------------
def test_hart_every_register_round_trips() -> None:
    bus = Bus(RAM, 1 << 20)
    h = Hart(0, bus, Clock(), native_regs=True)
    for i, name in enumerate(Hart._SAVED):
        setattr(h, name, 0x1000 + 8 * i)
    h.priv, h.frm, h.fflags, h.state, h.idle = 1, 3, 0x15, 2, True
    h.mstatus = (1 << 18) | (1 << 13) | (1 << 8)          # SUM, FS, SPP
    h.satp = (8 << 60) | 0x1234
    h.mtvec, h.stvec = 0x8000_0101, 0x8000_0200
    for i in range(32):
        h.x[i] = (i * 0x0123_4567_89AB_CDEF) & ((1 << 64) - 1)
        h.f[i] = (0xFFFF_FFFF_0000_0000 | i) if i % 2 else 0x4009_21FB_5444_2D18 + i
    h.pmp = [i * 3 for i in range(80)]
    h.resv = 0x40
    state = h.save()
    assert len({v for k, v in state.items() if k in Hart._SAVED and k not in ("idle",)}) > 20
    other = Hart(0, Bus(RAM, 1 << 20), Clock(), native_regs=True)
    other.load(through_json(state, other.state_schema()))
    assert other.save() == state
    assert other.ctx == 2                 # S-mode with SUM: the TLB context follows the state


def test_plic_round_trips_with_claims_and_pending() -> None:
    levels: list[list[bool]] = [[False] * 4, [False] * 4]

    def make(k: int) -> Plic:
        return Plic(2, [lambda v, i=i: levels[k].__setitem__(i, v) for i in range(4)])
    p = make(0)
    for src in (1, 5, 10, 33, 70):
        p.write(4 * src, 4, src % 7 + 1)
    p.write(0x2000, 4, (1 << 1) | (1 << 5) | (1 << 10))
    p.write(0x2080 + 4, 4, 1 << 1)                         # context 1: source 33
    p.write(0x200000 + 0x1000, 4, 2)
    for src in (1, 5, 10, 33):
        p.set_level(src, True)
    assert p.read(0x200004, 4) == 5                          # claim the highest priority
    state = p.save()
    q = make(1)
    q.load(through_json(state, q.state_schema()))
    assert q.save() == state
    assert levels[1] == levels[0] and any(levels[1])
    assert q.read(0x200004, 4) == p.read(0x200004, 4)        # the next claim agrees


def test_uart_fifo_contents_round_trip() -> None:
    con = BufferBackend()
    u = Uart16550(IrqLine(), con)
    u.write(2, 1, 0x01)                                      # FIFO on
    u.write(1, 1, 0x01)                                      # receive interrupt on
    u.write(7, 1, 0x5A)                                      # scratch
    con.feed(b"typed ahead" + bytes(range(20)))
    state = u.save()
    assert state["rx"] and state["host"]
    v = Uart16550(IrqLine(), BufferBackend())
    v.load(through_json(state, v.state_schema()))
    assert v.save() == state
    got = bytearray()
    while v.read(5, 1) & 1:                                  # LSR.DR: drain through RBR
        got.append(v.read(0, 1))
    assert bytes(got) == b"typed ahead" + bytes(range(20))


def test_virtio_queue_mid_use_round_trips() -> None:
    rig = make_rig(VirtioRng())
    d = rig.drv
    (q,) = d.init()
    for _ in range(3):
        q.add([d.buffer(16, writable=True)])
    d.kick()
    q.add([d.buffer(8, writable=True)])                      # posted, not yet kicked
    state = rig.mmio.save()
    assert state["device"]["queues"][0]["last_avail"] == 3
    other = make_rig(VirtioRng(source=lambda n: b"\x42" * n))
    other.bus.write_bytes(RAM, rig.bus.read_bytes(RAM, rig.bus.ram_size))
    other.mmio.load(through_json(state, other.mmio.state_schema()))
    assert other.mmio.save() == state
    q.bus = other.bus
    other.drv.kick()
    assert q.used_entries()[-1][1] == 8                     # the posted buffer is served after restore


@pytest.mark.parametrize("bad, where", [
    ({"size": 2 ** 40}, "queues[0].size"),
    ({"size": -1}, "queues[0].size"),
    ({"last_avail": 70000}, "queues[0].last_avail"),
    ({"ready": 1}, "queues[0].ready"),
    ({"extra": 0}, "unknown entries"),
])
def test_hostile_queue_state_is_refused(bad: dict[str, Any], where: str) -> None:
    rig = make_rig(VirtioRng())
    state = json.loads(json.dumps(rig.mmio.save(), default=encode_bytes))
    state["device"]["queues"][0].update(bad)
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        rig.mmio.state_schema()(state, "virtio0")


@pytest.mark.parametrize("field, value", [("priv", 2), ("mstatus", 2 << 11), ("satp", 10 << 60),
                                          ("resv", 1 << 20), ("x", [0] * 31), ("pc", 1 << 64),
                                          ("frm", True)])
def test_hostile_hart_state_is_refused(field: str, value: Any) -> None:
    hart = Hart(0, Bus(RAM, 1 << 20), Clock())
    state = hart.save()
    state[field] = value
    with pytest.raises(ConfigError, match=field):
        hart.state_schema()(state, "harts[0]")


# -- a whole machine: a bare-metal program run in two halves ------------------------------
def bare_vm(elf: Path, engine: str) -> Vm:
    spec = make_spec(bios=str(elf), memory=16 << 20, engine=engine)      # with virtio-rng
    return Vm(spec, BufferBackend())


def final(vm: Vm, elf: Path) -> tuple[Any, ...]:
    h = vm.board.harts[0]
    res = asm.symbols(elf)["result"]
    return (list(h.x), list(h.f), h.instret, h.pc, vm.board.bus.read_bytes(res, 32))


@pytest.mark.parametrize("engine", ENGINES)
def test_program_across_snapshot_matches_uninterrupted_run(program: Path, engine: str,
                                                           tmp_path: Path) -> None:
    whole = bare_vm(program, engine)
    assert whole.run(max_instructions=50_000_000) == 0
    want = final(whole, program)
    whole.close()
    assert want[4][24:32] == (0x600D).to_bytes(8, "little")
    assert want[2] > 200_000

    first = bare_vm(program, engine)
    assert first.run(max_instructions=100_000) is None      # stopped at a slice boundary mid-way
    mid_instret = first.board.harts[0].instret
    assert 0 < mid_instret < want[2]
    save_snapshot(first, tmp_path / "snap", then="quit")
    first.close()
    for restore_engine in (engine, "interp"):               # translations are not state
        second = load_snapshot(tmp_path / "snap", BufferBackend(), overrides=Overrides(engine=restore_engine))
        assert second.board.harts[0].instret == mid_instret
        assert second.run(max_instructions=50_000_000) == 0
        assert final(second, program) == want
        second.close()


# -- damaged and hostile snapshot files ---------------------------------------------------------
@pytest.fixture(scope="module")
def snapshot(program: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    vm = bare_vm(program, "interp")
    vm.run(max_instructions=40_000)
    d = tmp_path_factory.mktemp("good") / "snap"
    save_snapshot(vm, d, then="quit")
    vm.close()
    return d


def copy_of(snapshot: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    d.mkdir(parents=True)
    for f in snapshot.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def edit_manifest(d: Path, **changes: Any) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m.update(changes)
    (d / "manifest.json").write_text(json.dumps(m))


def rewrite_state(d: Path, data: bytes) -> None:
    import hashlib
    (d / "state.json").write_bytes(data)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(m))


def test_ram_file_is_sparse_and_never_written(snapshot: Path) -> None:
    st = (snapshot / "ram").stat()
    assert st.st_size == (16 << 20) + 4096
    assert st.st_blocks * 512 < st.st_size // 8
    before = (snapshot / "ram").read_bytes()
    vm = load_snapshot(snapshot, BufferBackend())
    vm.run(max_instructions=200_000)
    vm.board.bus.write_bytes(RAM, b"\xff" * 4096)             # guest writes stay private
    vm.close()
    assert (snapshot / "ram").read_bytes() == before


def damage_version(d: Path) -> None:
    edit_manifest(d, version=999)


def damage_format(d: Path) -> None:
    edit_manifest(d, format="qemu")


def truncate_ram(d: Path) -> None:
    os.truncate(d / "ram", 4096 * 3)


def remove_state(d: Path) -> None:
    (d / "state.json").unlink()


def corrupt_state_bytes(d: Path) -> None:
    data = bytearray((d / "state.json").read_bytes())
    data[10] ^= 0x20
    (d / "state.json").write_bytes(bytes(data))


def state_not_json(d: Path) -> None:
    rewrite_state(d, b'{"clock": [1, 2')


def state_deeply_nested(d: Path) -> None:
    rewrite_state(d, b"[" * 100_000 + b"]" * 100_000)


def state_huge_integer(d: Path) -> None:
    rewrite_state(d, b'{"clock": {"ticks": ' + b"9" * 6000 + b"}}")


def _edit_state(d: Path, fn: Any) -> None:
    state = json.loads((d / "state.json").read_text())
    fn(state)
    rewrite_state(d, json.dumps(state).encode())


def state_huge_queue(d: Path) -> None:
    def f(s: Any) -> None:
        s["devices"]["virtio0"]["device"]["queues"][0]["size"] = 2 ** 40
    _edit_state(d, f)


def state_two_harts(d: Path) -> None:
    _edit_state(d, lambda s: s["harts"].append(s["harts"][0]))


def state_bad_priv(d: Path) -> None:
    _edit_state(d, lambda s: s["harts"][0].update(priv=2))


def state_tohost_outside_ram(d: Path) -> None:
    _edit_state(d, lambda s: s.update(tohost=0x1000))


def spec_more_cpus(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m["spec"]["cpus"] = 2
    (d / "manifest.json").write_text(json.dumps(m))


DAMAGE = [(damage_version, "version 999 is not supported .*reads version 1"),
          (damage_format, "not a pyvirt snapshot"),
          (truncate_ram, "ram is 12288 bytes, the manifest says"),
          (remove_state, "state.json is missing"),
          (corrupt_state_bytes, "does not match its sha256"),
          (state_not_json, "not valid JSON"),
          (state_deeply_nested, "not valid JSON|expected an object"),
          (state_huge_integer, "not valid JSON"),
          (state_huge_queue, "virtio0"),
          (state_two_harts, r"harts: 2 items where the machine has 1"),
          (state_bad_priv, r"harts\[0\].priv"),
          (state_tohost_outside_ram, "tohost"),
          (spec_more_cpus, "harts: 1 items where the machine has 2")]


@pytest.mark.parametrize("damage, message", DAMAGE, ids=[d.__name__ for d, _ in DAMAGE])
def test_damaged_snapshot_is_one_config_error(snapshot: Path, tmp_path: Path, damage: Any,
                                              message: str) -> None:
    d = copy_of(snapshot, tmp_path)
    damage(d)
    with pytest.raises(ConfigError, match=message) as e:
        load_snapshot(d, BufferBackend())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", [damage_version, truncate_ram, state_huge_queue, state_deeply_nested],
                         ids=lambda d: d.__name__)
def test_cli_restore_of_bad_snapshot_fails_in_one_line(snapshot: Path, tmp_path: Path, damage: Any) -> None:
    d = copy_of(snapshot, tmp_path)
    damage(d)
    p = subprocess.run([sys.executable, "-m", "pyvirt", "run", "--restore", str(d)], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 1
    assert err.startswith("pyvirt: error: snapshot") and err.count("\n") == 1, err
    if damage is damage_version:
        assert "999" in err and "version 1" in err


def test_cli_restore_runs_the_program_to_its_end(snapshot: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "pyvirt", "run", "--restore", str(snapshot)],
                       capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    assert p.returncode == 0, p.stderr.decode()


def test_snapshot_into_non_empty_directory_is_refused(program: Path, tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep me")
    vm = bare_vm(program, "interp")
    vm.run(max_instructions=20_000)
    with pytest.raises(ConfigError, match="not empty"):
        save_snapshot(vm, tmp_path)
    vm.close()


def test_clone_gets_its_own_mac_and_network(program: Path, tmp_path: Path) -> None:
    import socket

    from pyvirt.spec import NetSpec
    servers = []
    for name in ("one", "two"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / name))
        s.listen(4)
        servers.append(s)
    try:
        spec = make_spec(bios=str(program), memory=16 << 20, engine="interp",
                         nets=[NetSpec(backend="stream", socket=tmp_path / "one", mac="52:54:00:00:00:01")])
        vm = Vm(spec, BufferBackend())
        vm.run(max_instructions=20_000)
        save_snapshot(vm, tmp_path / "snap", then="quit")
        vm.close()
        same = load_snapshot(tmp_path / "snap", BufferBackend())
        assert same.board.nics[0].config()[:6] == bytes.fromhex("525400000001")
        same.close()
        clone = load_snapshot(tmp_path / "snap", BufferBackend(), overrides=Overrides(
            nets=[NetSpec(backend="stream", socket=tmp_path / "two")], macs=["52:54:00:ab:cd:ef"]))
        assert clone.board.nics[0].config()[:6] == bytes.fromhex("525400abcdef")
        assert clone.spec.nets[0].socket == tmp_path / "two"
        servers[1].settimeout(5)
        servers[1].accept()[0].close()                  # the clone's backend is a new connection there
        clone.close()
        with pytest.raises(ConfigError, match="multicast"):
            load_snapshot(tmp_path / "snap", BufferBackend(), overrides=Overrides(macs=["01:00:00:00:00:01"]))
    finally:
        for s in servers:
            s.close()


def test_restored_port_sockets_can_be_moved(program: Path, tmp_path: Path) -> None:
    """A clone next to its original binds its own virtio-console port sockets."""
    from pyvirt.spec import PortSpec
    spec = make_spec(bios=str(program), memory=16 << 20, engine="interp",
                     ports=[PortSpec(name="org.x", socket=tmp_path / "orig.sock")])
    vm = Vm(spec, BufferBackend())
    vm.run(max_instructions=20_000)
    save_snapshot(vm, tmp_path / "snap", then="continue")
    assert (tmp_path / "orig.sock").exists()             # the original still listens there
    clone = load_snapshot(tmp_path / "snap", BufferBackend(),
                          overrides=Overrides(ports={"org.x": tmp_path / "clone.sock"}))
    assert [p.socket for p in clone.spec.ports] == [tmp_path / "clone.sock"]
    assert (tmp_path / "clone.sock").exists()
    clone.close()
    vm.close()
    with pytest.raises(ConfigError, match="no port named 'org.y'"):
        load_snapshot(tmp_path / "snap", BufferBackend(), overrides=Overrides(ports={"org.y": tmp_path / "y"}))


def state_without_digest(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    del m["files"]["state.json"]["sha256"]
    (d / "manifest.json").write_text(json.dumps(m))


def test_state_must_have_a_digest(snapshot: Path, tmp_path: Path) -> None:
    d = copy_of(snapshot, tmp_path)
    state_without_digest(d)
    with pytest.raises(ConfigError, match="no sha256 for state.json"):
        load_snapshot(d, BufferBackend())


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_manifest_or_state_that_is_not_a_file_is_refused_without_reading_it(snapshot: Path, tmp_path: Path,
                                                                              kind: str) -> None:
    """A FIFO as a snapshot's manifest.json made the restore wait for a writer forever; a
    state.json that is a FIFO or a link to /dev/zero is refused before it is read."""
    for name in ("manifest.json", "state.json"):
        d = copy_of(snapshot, tmp_path / f"{kind}-{name}")
        (d / name).unlink()
        if kind == "fifo":
            os.mkfifo(d / name)
        else:
            (d / name).symlink_to("/dev/zero")
        expected = {"manifest.json": "cannot read manifest.json: not a regular file",
                    "state.json": "state.json is not a regular file"}[name]
        with pytest.raises(ConfigError, match=expected):
            load_snapshot(d, BufferBackend())


@pytest.mark.parametrize("args, message", [
    (["--restore", "x", "--kernel", "Image"], "--kernel does not apply"),
    (["--restore", "x", "--cpus", "2"], "--cpus does not apply"),
    (["--overlay-dir", "x", "--bios", "y"], "--overlay-dir goes with --restore"),
    (["--bios", "y", "--snapshot-after", "soon:dir"], "expected SECONDS:DIR"),
    (["--restore", "/nonexistent/snap"], "cannot read manifest.json"),
])
def test_cli_snapshot_flag_errors(args: list[str], message: str) -> None:
    p = subprocess.run([sys.executable, "-m", "pyvirt", "run", *args], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and message in err, err


def test_overlay_dir_reused_is_refused_in_words(program: Path, tmp_path: Path) -> None:
    """--overlay-dir keeps a clone's disk writes: a second restore into the same directory is
    refused with why, not a qcow2 error (issue 18 item 8)."""
    from pyvirt.spec import DiskSpec
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    spec = make_spec(bios=str(program), memory=16 << 20, engine="interp", disks=[DiskSpec(path=disk)])
    vm = Vm(spec, BufferBackend())
    vm.run(max_instructions=20_000)
    save_snapshot(vm, tmp_path / "snap", then="quit")
    vm.close()
    first = load_snapshot(tmp_path / "snap", BufferBackend(), overrides=Overrides(overlay_dir=tmp_path / "c1"))
    first.close()
    assert (tmp_path / "c1" / "disk0.qcow2").exists()
    with pytest.raises(ConfigError, match="exists already .*give --overlay-dir a new directory"):
        load_snapshot(tmp_path / "snap", BufferBackend(), overrides=Overrides(overlay_dir=tmp_path / "c1"))


def test_snapshot_files_are_the_owners_alone(tmp_path: Path) -> None:
    """A snapshot holds the guest's RAM and state: its directory is 0700 and its RAM and
    state files are not readable by others, whatever the umask (issue 14: CLI snapshots
    were world-readable)."""
    import stat as st

    from pyvirt.images import cached_default_image
    img = cached_default_image()
    if img is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    vm = Vm(make_spec(kernel=img.kernel, memory=16 << 20, engine="interp"), BufferBackend())
    old = os.umask(0o022)
    try:
        d = tmp_path / "snap"
        d.mkdir(mode=0o755)                               # (an empty directory given by the user)
        save_snapshot(vm, d, then="quit")
    finally:
        os.umask(old)
        vm.close()
    assert st.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("ram", "state.json"):
        assert st.S_IMODE((d / name).stat().st_mode) & 0o077 == 0, name


def test_snapshot_files_are_durable_before_the_manifest_is_trusted(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The RAM and state files, the manifest and the directory naming them are fsynced by
    save_snapshot before it returns, the RAM and state before the manifest that vouches for them
    (issue 14: snapshots were recorded by the daemon before they were durable)."""
    from pyvirt.images import cached_default_image
    from pyvirt.vmm.snapfiles import MANIFEST
    img = cached_default_image()
    if img is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    vm = Vm(make_spec(kernel=img.kernel, memory=16 << 20, engine="interp"), BufferBackend())
    d = tmp_path / "snap"
    try:
        save_snapshot(vm, d, then="quit")
    finally:
        vm.close()
    tmp = MANIFEST + ".tmp"                                # (fsynced, then renamed into place)
    for name in ("ram", "state.json", tmp):
        assert str(d / name) in synced, (name, synced)
    assert str(d) in synced, synced
    manifest = synced.index(str(d / tmp))
    assert synced.index(str(d / "ram")) < manifest and synced.index(str(d / "state.json")) < manifest
    assert synced.index(str(d)) > manifest                 # the directory names the renamed manifest


def test_a_snapshot_naming_a_shared_folder_it_was_not_taken_with_is_refused(snapshot: Path, tmp_path: Path) -> None:
    """A VM with a share is snapshotted with the share unmounted (docs/shares.md) and its
    virtio-fs device in the state; a manifest edited to name a share its state lacks is refused
    at restore with one line, and the virtiofsd started for it is gone again."""
    d = copy_of(snapshot, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    share = tmp_path / "sharedir"
    share.mkdir()
    edit_manifest(d, spec={**m["spec"], "shares": [{"path": str(share), "tag": "work"}]})
    with pytest.raises(ConfigError) as e:
        load_snapshot(d, BufferBackend())
    assert "\n" not in str(e.value) and "virtio1" in str(e.value), e.value     # (the device it lacks)
    left = subprocess.run(["pgrep", "-f", f"source={share}"], capture_output=True, text=True).stdout
    assert left == "", left


def test_a_vm_with_a_share_is_not_saved(program: Path, tmp_path: Path) -> None:
    vm = bare_vm(program, "interp")
    vm.spec = vm.spec.model_copy(update={"shares": [ShareSpec(path=tmp_path, tag="work")]})
    with pytest.raises(ConfigError, match="snapshot refused: the VM has a shared folder"):
        save_snapshot(vm, tmp_path / "snap", then="continue")
    assert not (tmp_path / "snap").exists()
    vm.close()
