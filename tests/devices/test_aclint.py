"""CLINT through its registers, with a hand-driven clock."""

from __future__ import annotations

from pyvirt.devices.aclint import Aclint
from pyvirt.devices.base import IrqLine
from pyvirt.testing.clock import MockClock

M64 = (1 << 64) - 1


def make(n: int = 2) -> tuple[Aclint, MockClock, list[IrqLine], list[IrqLine]]:
    clock = MockClock()
    msip, mtip = [IrqLine() for _ in range(n)], [IrqLine() for _ in range(n)]
    return Aclint(n, clock, msip, mtip), clock, msip, mtip


def test_msip() -> None:
    c, _, msip, _ = make()
    c.write(4, 4, 0xFFFF_FFFF)                    # only bit 0 exists
    assert c.read(4, 4) == 1 and msip[1].level and not msip[0].level
    c.write(4, 4, 0)
    assert not msip[1].level
    c.write(0, 8, 1)                              # msip is a 32-bit register
    c.write(2, 4, 1)
    assert not msip[0].level and c.read(0, 8) == 0


def test_mtimecmp_and_poll() -> None:
    c, clock, _, mtip = make()
    assert c.read(0x4000, 8) == M64 and c.next_deadline() is None
    c.write(0x4000, 8, 1000)
    assert not mtip[0].level and c.next_deadline() == 1000
    clock.advance(999)
    c.poll()
    assert not mtip[0].level
    clock.advance(1)
    c.poll()
    assert mtip[0].level and not mtip[1].level
    assert c.next_deadline() is None              # already firing: nothing left to wake for
    c.write(0x4000, 8, 5000)                      # moving mtimecmp ahead lowers MTIP at once
    assert not mtip[0].level
    c.write(0x4008, 4, 10)                        # hart 1 low half: high half stays all ones
    assert c.read(0x4008, 8) == (M64 & ~0xFFFF_FFFF) | 10
    c.write(0x400C, 4, 0)
    assert c.read(0x4008, 8) == 10 and mtip[1].level   # in the past: fires immediately
    assert c.next_deadline() == 5000


def test_lines_follow_the_clock_through_polls_with_nothing_due() -> None:
    """poll() skips the lines while all are down and nothing is due; it must still raise
    each one when its time comes and lower it when its compare value moves on."""
    c, clock, _, mtip = make(3)
    c.write(0x4000, 8, 300)
    c.write(0x4010, 8, 100)
    for _ in range(99):
        clock.advance(1)
        c.poll()
    assert not any(line.level for line in mtip)
    clock.advance(1)
    c.poll()
    assert [line.level for line in mtip] == [False, False, True]
    clock.advance(200)
    c.poll()
    assert [line.level for line in mtip] == [True, False, True]
    c.write(0x4010, 8, M64)                       # hart 2 disarmed; hart 0 stays up
    c.poll()
    assert [line.level for line in mtip] == [True, False, False]
    c.load(c.save() | {"mtimecmp": [M64, M64, M64]})
    assert not any(line.level for line in mtip)
    clock.advance(1 << 40)
    c.poll()
    assert not any(line.level for line in mtip)


def test_mtime_follows_clock_and_is_read_only() -> None:
    c, clock, _, _ = make()
    clock.advance((7 << 32) + 123)
    assert c.read(0xBFF8, 8) == (7 << 32) + 123
    assert (c.read(0xBFF8, 4), c.read(0xBFFC, 4)) == (123, 7)
    c.write(0xBFF8, 8, 0)
    assert c.read(0xBFF8, 8) == (7 << 32) + 123


def test_bad_accesses_ignored() -> None:
    c, _, _, _ = make()
    c.write(0x4002, 4, 0)                         # misaligned
    c.write(0x4000, 2, 0)                         # 16-bit
    c.write(0x4000 + 8 * 2, 8, 0)                 # no hart 2
    c.write(0x8, 4, 1)                            # no hart 2 msip
    assert c.save() == {"msip": [0, 0], "mtimecmp": [M64, M64]}
    assert c.read(0x4004, 8) == 0 and c.read(0x9000, 4) == 0


def test_save_load_reset() -> None:
    c, clock, msip, mtip = make()
    c.write(0, 4, 1)
    c.write(0x4008, 8, 50)
    clock.advance(60)
    c.poll()
    state = c.save()
    c2 = Aclint(2, clock, [IrqLine(), IrqLine()], [IrqLine(), IrqLine()])
    c2.load(state)
    assert c2.msip_lines[0].level and c2.mtip_lines[1].level and not c2.mtip_lines[0].level
    c.reset()
    assert not msip[0].level and not mtip[1].level and c.read(0x4008, 8) == M64
