"""Sstc on the virt board: the device tree offers it, the SBI-served harts have it enabled,
and the board's poll raises STIP from stimecmp (the kernel then never calls the SBI timer)."""

from __future__ import annotations

import struct
from pathlib import Path

from pyvirt.backends.char import BufferBackend
from pyvirt.cpu.riscv.csr import STCE, STIP
from pyvirt.machine.riscv_virt import VirtBoard
from pyvirt.spec import make_spec


def _kernel(tmp_path: Path) -> Path:
    hdr = bytearray(64)
    struct.pack_into("<IIQQ", hdr, 0, 0x0000006F, 0, 0x200000, 0x1000)   # j . ; text_offset; size
    hdr[48:56] = b"RISCV\0\0\0"
    hdr[56:60] = b"RSC\x05"
    k = tmp_path / "Image"
    k.write_bytes(bytes(hdr) + b"\x13\x00\x00\x00")
    return k


def test_sstc_offered_enabled_and_polled(tmp_path: Path) -> None:
    board = VirtBoard(make_spec(kernel=str(_kernel(tmp_path)), memory=32 << 20, cpus=2, engine="interp"),
                      BufferBackend())
    assert b"_sstc" in board.dtb
    for h in board.harts:
        assert h.menvcfg & STCE and h.mcounteren & 2
    h = board.harts[0]
    h.stimecmp = board.clock.ticks() + 10**9
    board.poll()
    assert not h.mip & STIP
    h.stimecmp = 0
    board.poll()
    assert h.mip & STIP
    assert board.next_deadline() == 0
