"""Goldfish RTC with an injected wall clock."""

from __future__ import annotations

from pyvirt.devices.base import IrqLine
from pyvirt.devices.goldfish_rtc import (
    ALARM_HIGH,
    ALARM_LOW,
    ALARM_STATUS,
    CLEAR_ALARM,
    CLEAR_INTERRUPT,
    IRQ_ENABLED,
    TIME_HIGH,
    TIME_LOW,
    GoldfishRtc,
)
from pyvirt.testing.clock import MockClock

T0 = 1_700_000_000_123_456_789


class Wall:
    def __init__(self) -> None:
        self.ns = T0

    def __call__(self) -> int:
        return self.ns


def make() -> tuple[GoldfishRtc, IrqLine, Wall, MockClock]:
    irq, wall, clock = IrqLine(), Wall(), MockClock()
    return GoldfishRtc(irq, now_ns=wall, clock=clock), irq, wall, clock


def read_time(r: GoldfishRtc) -> int:
    lo = r.read(TIME_LOW, 4)
    return (r.read(TIME_HIGH, 4) << 32) | lo


def set_alarm(r: GoldfishRtc, t: int) -> None:
    r.write(ALARM_HIGH, 4, t >> 32)
    r.write(ALARM_LOW, 4, t & 0xFFFF_FFFF)


def test_time_low_latches_high() -> None:
    r, _, wall, _ = make()
    assert read_time(r) == T0
    lo = r.read(TIME_LOW, 4)
    wall.ns += 1 << 32                            # the high half moves between the two reads
    assert r.read(TIME_HIGH, 4) == T0 >> 32       # but TIME_HIGH is what LOW latched
    assert lo == T0 & 0xFFFF_FFFF


def test_guest_sets_time() -> None:
    r, _, wall, _ = make()
    new = 946_684_800 * 10**9                     # 2000-01-01
    r.write(TIME_HIGH, 4, new >> 32)              # Linux writes HIGH first, then LOW
    r.write(TIME_LOW, 4, new & 0xFFFF_FFFF)
    assert read_time(r) == new
    wall.ns += 5_000
    assert read_time(r) == new + 5_000            # and it keeps running with the host


def test_alarm_fires_on_poll() -> None:
    r, irq, wall, clock = make()
    r.write(IRQ_ENABLED, 4, 1)
    set_alarm(r, T0 + 2_000_000)                  # 2 ms ahead
    assert r.read(ALARM_STATUS, 4) == 1 and not irq.level
    assert (r.read(ALARM_HIGH, 4) << 32 | r.read(ALARM_LOW, 4)) == T0 + 2_000_000
    assert r.next_deadline() == clock.ticks() + 20_000    # 2 ms of a 10 MHz timebase
    wall.ns += 1_999_999
    r.poll()
    assert not irq.level
    wall.ns += 1
    r.poll()
    assert irq.level and r.read(ALARM_STATUS, 4) == 0 and r.next_deadline() is None
    r.write(CLEAR_INTERRUPT, 4, 1)
    assert not irq.level


def test_past_alarm_fires_at_once_and_enable_gates_line() -> None:
    r, irq, _, _ = make()
    set_alarm(r, T0 - 1)
    assert not irq.level and r.read(ALARM_STATUS, 4) == 0   # fired, but interrupts disabled
    r.write(IRQ_ENABLED, 4, 1)
    assert irq.level and r.read(IRQ_ENABLED, 4) == 1
    r.write(IRQ_ENABLED, 4, 0)
    assert not irq.level


def test_clear_alarm_disarms() -> None:
    r, irq, wall, _ = make()
    r.write(IRQ_ENABLED, 4, 1)
    set_alarm(r, T0 + 10)
    r.write(CLEAR_ALARM, 4, 1)
    wall.ns += 100
    r.poll()
    assert not irq.level and r.read(ALARM_STATUS, 4) == 0


def test_save_load_keeps_guest_offset() -> None:
    r, _, wall, _ = make()
    r.write(TIME_HIGH, 4, 0)
    r.write(TIME_LOW, 4, 1000)                    # guest time = 1000 ns
    r.write(IRQ_ENABLED, 4, 1)
    set_alarm(r, 5000)
    state = r.save()
    irq2, wall2 = IrqLine(), Wall()
    wall2.ns = wall.ns + 3000                     # restored 3 us later (host time)
    r2 = GoldfishRtc(irq2, now_ns=wall2)
    r2.load(state)
    assert read_time(r2) == 4000                  # tracks the host, offset kept
    assert r2.read(ALARM_STATUS, 4) == 1 and not irq2.level
    wall2.ns += 1000
    r2.poll()
    assert irq2.level
    assert r2.next_deadline() is None             # no clock given: poll-only


def test_reset_and_bad_widths() -> None:
    r, irq, _, _ = make()
    r.write(IRQ_ENABLED, 4, 1)
    set_alarm(r, T0 - 1)
    assert irq.level
    r.write(CLEAR_INTERRUPT, 2, 1)                # 16-bit write: ignored
    assert irq.level and r.read(TIME_LOW, 8) == 0
    r.reset()
    assert not irq.level and r.read(IRQ_ENABLED, 4) == 0 and read_time(r) == T0
