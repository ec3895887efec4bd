"""The VMM step that opens a spec's host resources for the board (vmm/resources.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.backends.disk import open_disk
from pyvirt.errors import ConfigError
from pyvirt.machine.riscv_virt import VIRTIO_SLOTS
from pyvirt.spec import make_spec
from pyvirt.vmm.resources import build_board, open_backends
from pyvirt.vmm.vm import Vm


def _disk(tmp_path: Path, name: str = "d.img") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(1 << 20))
    return path


def _bios(tmp_path: Path, words: tuple[int, ...] = (0x0000006F,)) -> Path:
    """Firmware made of these instruction words (default `j .`), loaded at RAM's start."""
    code = b"".join(struct.pack("<I", w) for w in words)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        2,
        243,
        1,
        0x8000_0000,
        64,
        0,
        0,
        64,
        56,
        1,
        64,
        0,
        0,
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 120, 0x8000_0000, 0x8000_0000, len(code), len(code), 0x1000)
    path = tmp_path / "fw.elf"
    path.write_bytes(ehdr + phdr + code)
    return path


# Count t2 down from 0x6000 (about 50 000 instructions), then ask the syscon for a reset.
COUNTDOWN_THEN_RESET = (
    0x000063B7,  # lui t2, 0x6
    0xFFF38393,  # 1: addi t2, t2, -1
    0xFE039EE3,  # bnez t2, 1b
    0x001002B7,  # lui t0, 0x100        (the syscon)
    0x00007337,  # lui t1, 0x7
    0x77730313,  # addi t1, t1, 0x777   (FINISHER_RESET)
    0x0062A023,  # sw t1, 0(t0)
    0x0000006F,  # j .
)


def test_a_failure_leaves_nothing_open(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    spec = make_spec(
        bios=str(_bios(tmp_path)),
        memory=16 << 20,
        disks=[{"path": disk}],
        ports=[{"name": "hvc0", "socket": tmp_path / "no" / "such" / "dir.sock"}],
    )
    with pytest.raises(ConfigError, match="cannot listen"):
        open_backends(spec)
    open_disk(disk).close()  # the disk's write lock was released


def test_too_many_devices_is_refused_before_anything_opens(tmp_path: Path) -> None:
    missing = [{"path": tmp_path / f"missing{i}.img"} for i in range(VIRTIO_SLOTS + 1)]
    spec = make_spec(bios=str(_bios(tmp_path)), memory=16 << 20, disks=missing)
    with pytest.raises(ConfigError, match="too many virtio devices"):
        open_backends(spec)


def test_the_board_owns_and_closes_what_it_is_given(tmp_path: Path) -> None:
    disk, sock = _disk(tmp_path), tmp_path / "hvc0.sock"
    spec = make_spec(
        bios=str(_bios(tmp_path)),
        memory=16 << 20,
        disks=[{"path": disk}],
        ports=[{"name": "hvc0", "socket": sock}],
    )
    board = build_board(spec, BufferBackend())
    assert sock.exists() and board.backends == board.host.disks and len(board.backends) == 1
    board.close()
    assert not sock.exists()
    open_disk(disk).close()


def test_a_board_that_fails_closes_what_it_was_given(tmp_path: Path) -> None:
    sock = tmp_path / "hvc0.sock"
    spec = make_spec(memory=16 << 20, ports=[{"name": "hvc0", "socket": sock}])  # nothing to boot
    with pytest.raises(ConfigError, match="nothing to boot"):
        build_board(spec, BufferBackend())
    assert not sock.exists()


def test_a_guest_reset_closes_and_reopens_the_host_side(tmp_path: Path) -> None:
    """A reset rebuilds the board (ARCHITECTURE.md, departures): its backends are closed and
    opened afresh, so the disk's lock and the port's socket are had again."""
    disk, sock = _disk(tmp_path), tmp_path / "hvc0.sock"
    spec = make_spec(
        bios=str(_bios(tmp_path, COUNTDOWN_THEN_RESET)),
        memory=16 << 20,
        rng=False,
        disks=[{"path": disk}],
        ports=[{"name": "hvc0", "socket": sock}],
    )
    vm = Vm(spec, BufferBackend())
    try:
        assert vm.run(max_instructions=400_000) is None
        assert vm.stats.resets >= 2 and sock.exists() and len(vm.board.backends) == 1
    finally:
        vm.close()
    assert not sock.exists()
    open_disk(disk).close()
