"""The VM clock: one per VM, counting `timebase` ticks per second.

Normally it follows the host's monotonic clock; it stops while the VM is
paused so that a resumed, restored or migrated guest sees no jump.
"""

from __future__ import annotations

import time

from pyvirt.state import Schema, integer, record

TIMEBASE_HZ = 10_000_000


class Clock:
    def __init__(self, hz: int = TIMEBASE_HZ) -> None:
        self.hz = hz
        self._offset_ns = time.monotonic_ns()
        self._paused_at: int | None = None

    def ticks(self) -> int:
        now = self._paused_at if self._paused_at is not None else time.monotonic_ns()
        return (now - self._offset_ns) * self.hz // 1_000_000_000

    def native_params(self) -> tuple[int, int]:
        """(host monotonic ns at tick 0, host ns per tick) for native code's rdtime, which
        computes `ticks` as (monotonic ns - the first) // the second; the second is 0
        (native code leaves rdtime to Python) when paused or when a tick is not a whole
        number of ns."""
        per_tick, rest = divmod(1_000_000_000, self.hz)
        return self._offset_ns, per_tick if not rest and self._paused_at is None else 0

    def seconds_until(self, tick: int) -> float:
        """Host seconds until the clock reaches `tick` (0 if already there)."""
        delta = tick - self.ticks()
        return max(0.0, delta / self.hz)

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.monotonic_ns()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._offset_ns += time.monotonic_ns() - self._paused_at
            self._paused_at = None

    def state_schema(self) -> Schema:
        """What `load()` accepts (checked before it runs; pyvirt/state.py)."""
        return record({"ticks": integer(0, (1 << 63) - 1)})

    def save(self) -> dict[str, int]:
        return {"ticks": self.ticks()}

    def load(self, state: dict[str, int]) -> None:
        self._paused_at = None
        self._offset_ns = time.monotonic_ns() - state["ticks"] * 1_000_000_000 // self.hz
