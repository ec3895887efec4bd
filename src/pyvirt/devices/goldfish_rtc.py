"""Goldfish RTC (Android emulator "goldfish" real-time clock; Linux rtc-goldfish).

TIME_LOW/HIGH give nanoseconds since the Unix epoch (reading TIME_LOW latches
TIME_HIGH), ALARM_LOW/HIGH arm an alarm (writing ALARM_LOW arms it),
IRQ_ENABLED, CLEAR_ALARM, ALARM_STATUS and CLEAR_INTERRUPT control it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pyvirt.devices.base import IrqLine

TIME_LOW, TIME_HIGH, ALARM_LOW, ALARM_HIGH = 0x00, 0x04, 0x08, 0x0C
IRQ_ENABLED, CLEAR_ALARM, ALARM_STATUS, CLEAR_INTERRUPT = 0x10, 0x14, 0x18, 0x1C


class GoldfishRtc:
    SIZE = 0x1000

    def __init__(self, irq: IrqLine, now_ns: Callable[[], int] = time.time_ns) -> None:
        self.irq = irq
        self.now_ns = now_ns
        self.reset()

    def reset(self) -> None:
        self.offset_ns = 0          # guest-set time minus host time
        self.latched_high = 0
        self.alarm = 0
        self.alarm_armed = False
        self.irq_enabled = 0
        self.irq_pending = False
        self.alarm_high = 0
        self.irq.set(False)

    def _now(self) -> int:
        return self.now_ns() + self.offset_ns

    def poll(self) -> None:
        if self.alarm_armed and self._now() >= self.alarm:
            self.alarm_armed = False
            self.irq_pending = True
        self.irq.set(self.irq_pending and bool(self.irq_enabled))

    def next_deadline(self) -> int | None:
        return None                  # alarms are checked at every poll (between slices)

    def read(self, offset: int, size: int) -> int:
        if offset == TIME_LOW:
            now = self._now()
            self.latched_high = now >> 32
            return now & 0xFFFFFFFF
        if offset == TIME_HIGH:
            return self.latched_high
        if offset == ALARM_LOW:
            return self.alarm & 0xFFFFFFFF
        if offset == ALARM_HIGH:
            return self.alarm >> 32
        if offset == IRQ_ENABLED:
            return self.irq_enabled
        if offset == ALARM_STATUS:
            return int(self.alarm_armed)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if offset == TIME_LOW:
            self.offset_ns = ((self.latched_high << 32) | value) - self.now_ns()
        elif offset == TIME_HIGH:
            self.latched_high = value
        elif offset == ALARM_HIGH:
            self.alarm_high = value
        elif offset == ALARM_LOW:
            self.alarm = (self.alarm_high << 32) | value
            self.alarm_armed = True
            self.poll()
        elif offset == IRQ_ENABLED:
            self.irq_enabled = value & 1
            self.poll()
        elif offset == CLEAR_ALARM:
            self.alarm_armed = False
        elif offset == CLEAR_INTERRUPT:
            self.irq_pending = False
            self.poll()

    def save(self) -> dict[str, Any]:
        return {"time_ns": self._now(), "alarm": self.alarm, "alarm_armed": self.alarm_armed,
                "irq_enabled": self.irq_enabled, "irq_pending": self.irq_pending}

    def load(self, state: dict[str, Any]) -> None:
        self.offset_ns = state["time_ns"] - self.now_ns()
        self.alarm, self.alarm_armed = state["alarm"], state["alarm_armed"]
        self.irq_enabled, self.irq_pending = state["irq_enabled"], state["irq_pending"]
        self.poll()
