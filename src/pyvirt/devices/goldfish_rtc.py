"""Goldfish RTC ("google,goldfish-rtc"; the Android emulator's real-time clock, as
Linux's rtc-goldfish driver and QEMU's model use it).  32-bit registers::

    0x00 TIME_LOW         read: low half of the time in ns since the Unix epoch,
                          and latches the high half into TIME_HIGH
    0x04 TIME_HIGH        read: the latched high half
                          (a write to either half sets that half of the time)
    0x08 ALARM_LOW        write: low half of the alarm time; arms the alarm
    0x0c ALARM_HIGH       write: high half of the alarm time (write it first)
    0x10 IRQ_ENABLED      bit 0: the alarm interrupt may reach the line
    0x14 CLEAR_ALARM      write: disarm
    0x18 ALARM_STATUS     read: 1 while armed
    0x1c CLEAR_INTERRUPT  write: acknowledge a fired alarm

The time is the host's wall clock (`now_ns`, injectable) plus the offset the
guest set.  The offset -- not the absolute time -- is what a snapshot keeps,
so a restored guest's calendar time tracks the host again, as with QEMU.  An
armed alarm fires in `poll()` once due; `next_deadline()` gives its time in
VM clock ticks (when a clock was given) so the run loop wakes for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from pyvirt.devices.base import IrqLine
from pyvirt.state import U32, U64, Schema, boolean, integer, record

TIME_LOW, TIME_HIGH, ALARM_LOW, ALARM_HIGH = 0x00, 0x04, 0x08, 0x0C
IRQ_ENABLED, CLEAR_ALARM, ALARM_STATUS, CLEAR_INTERRUPT = 0x10, 0x14, 0x18, 0x1C
M32, M64 = 0xFFFF_FFFF, (1 << 64) - 1


class TickSource(Protocol):
    hz: int

    def ticks(self) -> int: ...


class GoldfishRtc:
    SIZE = 0x1000

    def __init__(self, irq: IrqLine, now_ns: Callable[[], int] = time.time_ns,
                 clock: TickSource | None = None) -> None:
        self.irq = irq
        self.now_ns = now_ns
        self.clock = clock
        self.offset_ns = 0            # guest time minus host time; survives reset (a battery)
        self.reset()

    def reset(self) -> None:
        self.time_high = 0
        self.alarm = 0
        self.alarm_armed = False
        self.irq_enabled = False
        self.irq_pending = False
        self.irq.set(False)

    def _now(self) -> int:
        return (self.now_ns() + self.offset_ns) & M64

    def _update(self) -> None:
        self.irq.set(self.irq_pending and self.irq_enabled)

    # -- time ---------------------------------------------------------------------------
    def poll(self) -> None:
        """Fire the alarm if it is due."""
        if self.alarm_armed and self._now() >= self.alarm:
            self.alarm_armed = False
            self.irq_pending = True
            self._update()

    def next_deadline(self) -> int | None:
        """The armed alarm's time in clock ticks; None without an alarm or a clock."""
        if not self.alarm_armed or self.clock is None:
            return None
        delta_ns = max(0, self.alarm - self._now())
        return self.clock.ticks() + -(-delta_ns * self.clock.hz // 1_000_000_000)

    # -- registers ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 4:
            return 0
        if offset == TIME_LOW:
            now = self._now()
            self.time_high = now >> 32
            return now & M32
        if offset == TIME_HIGH:
            return self.time_high
        if offset == ALARM_LOW:
            return self.alarm & M32
        if offset == ALARM_HIGH:
            return self.alarm >> 32
        if offset == IRQ_ENABLED:
            return int(self.irq_enabled)
        if offset == ALARM_STATUS:
            return int(self.alarm_armed)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        value &= M32
        if offset in (TIME_LOW, TIME_HIGH):
            now = self._now()
            new = (now & ~M32) | value if offset == TIME_LOW else (now & M32) | (value << 32)
            self.offset_ns += new - now
        elif offset == ALARM_HIGH:
            self.alarm = (self.alarm & M32) | (value << 32)
        elif offset == ALARM_LOW:
            self.alarm = (self.alarm & ~M32) | value
            self._arm()
        elif offset == IRQ_ENABLED:
            self.irq_enabled = bool(value & 1)
            self._update()
        elif offset == CLEAR_ALARM:
            self.alarm_armed = False
        elif offset == CLEAR_INTERRUPT:
            self.irq_pending = False
            self._update()

    def _arm(self) -> None:
        """An alarm already due fires at once; a later one waits for `poll()`."""
        self.alarm_armed = True
        self.poll()

    # -- state ---------------------------------------------------------------------------
    def state_schema(self) -> Schema:
        """What `load()` accepts (checked before it runs; pyvirt/state.py)."""
        return record({"offset_ns": integer(-M64, M64), "time_high": U32, "alarm": U64,
                       "alarm_armed": boolean, "irq_enabled": boolean, "irq_pending": boolean})

    def save(self) -> dict[str, Any]:
        return {"offset_ns": self.offset_ns, "time_high": self.time_high, "alarm": self.alarm,
                "alarm_armed": self.alarm_armed, "irq_enabled": self.irq_enabled,
                "irq_pending": self.irq_pending}

    def load(self, state: dict[str, Any]) -> None:
        self.offset_ns = state["offset_ns"]
        self.time_high = state["time_high"]
        self.alarm, self.alarm_armed = state["alarm"], state["alarm_armed"]
        self.irq_enabled, self.irq_pending = state["irq_enabled"], state["irq_pending"]
        self._update()
        self.poll()
