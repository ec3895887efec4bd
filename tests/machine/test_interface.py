"""The board's side of the VMM boundary: a slice of guest execution ends in a typed exit."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.engines import ENGINES, native_available
from pyvirt.machine.interface import BudgetSpent, Halt, Machine, Reset, Wfi
from pyvirt.machine.riscv_virt import VirtBoard
from pyvirt.spec import make_spec

RAM = 0x8000_0000
LUI_T0_SYSCON = 0x001002B7  # lui t0, 0x100       (t0 = 0x100000, the syscon)
SW_T1_T0 = 0x0062A023  # sw t1, 0(t0)
J_SELF = 0x0000006F  # j .
WFI_LOOP = [0x10500073, 0xFFDFF06F]  # 1: wfi; j 1b   (interrupts disabled: stays waiting)


def _syscon_program(value: int) -> list[int]:
    hi, lo = (value + 0x800) >> 12, value & 0xFFF
    lui_t1 = (hi << 12) | (6 << 7) | 0x37
    addi_t1 = ((lo if lo < 0x800 else lo - 0x1000) & 0xFFF) << 20 | (6 << 15) | (6 << 7) | 0x13
    return [LUI_T0_SYSCON, lui_t1, addi_t1, SW_T1_T0, J_SELF]


def _elf(tmp_path: Path, words: list[int]) -> Path:
    code = b"".join(struct.pack("<I", w) for w in words)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 243, 1, RAM, 64, 0, 0, 64, 56, 1, 64, 0, 0
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 64 + 56, RAM, RAM, len(code), len(code), 0x1000)
    path = tmp_path / "fw.elf"
    path.write_bytes(ehdr + phdr + code)
    return path


@pytest.fixture(params=[e for e in ENGINES if e != "native" or native_available()])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _board(tmp_path: Path, words: list[int], engine: str) -> Machine:
    spec = make_spec(bios=str(_elf(tmp_path, words)), memory=16 << 20, engine=engine, rng=False)
    return VirtBoard(spec, BufferBackend())


@pytest.mark.parametrize(
    ("value", "expect"), [(0x5555, Halt(0)), ((3 << 16) | 0x3333, Halt(3)), (0x7777, Reset())]
)
def test_power_events_end_the_slice_typed(tmp_path: Path, engine: str, value: int, expect: object) -> None:
    board = _board(tmp_path, _syscon_program(value), engine)
    try:
        ended = board.run_slice(1000)
        assert type(ended) is type(expect) and ended.instructions > 0
        if isinstance(expect, Halt):
            assert isinstance(ended, Halt) and ended.code == expect.code == board.exit_code
        else:
            assert board.reset_requested and board.exit_code is None
    finally:
        board.close()


def test_a_waiting_hart_is_a_wfi_exit(tmp_path: Path, engine: str) -> None:
    board = _board(tmp_path, WFI_LOOP, engine)
    try:
        first = board.run_slice(1000)
        assert isinstance(first, BudgetSpent) and first.instructions >= 1
        assert board.run_slice(1000) == Wfi() and not board.interrupt_pending()
    finally:
        board.close()
