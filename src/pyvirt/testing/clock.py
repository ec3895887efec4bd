"""A clock for tests: the `pyvirt.clock.Clock` interface, advanced by hand."""

from __future__ import annotations

from pyvirt.clock import TIMEBASE_HZ
from pyvirt.state import Schema, integer, record


class MockClock:
    """Time moves only when a test calls `advance()` -- and not while paused,
    just as the real clock stands still while its VM is paused."""

    def __init__(self, hz: int = TIMEBASE_HZ, start: int = 0) -> None:
        self.hz = hz
        self.now = start
        self.paused = False

    def advance(self, ticks: int) -> None:
        if ticks < 0:
            raise ValueError("a clock does not go backwards")
        if not self.paused:
            self.now += ticks

    def advance_seconds(self, seconds: float) -> None:
        self.advance(round(seconds * self.hz))

    def ticks(self) -> int:
        return self.now

    def seconds_until(self, tick: int) -> float:
        """Seconds until the clock reaches `tick` (0 if already there)."""
        return max(0.0, (tick - self.now) / self.hz)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def state_schema(self) -> Schema:
        """What `load()` accepts (checked before it runs; pyvirt/state.py)."""
        return record({"ticks": integer(0, (1 << 63) - 1)})

    def save(self) -> dict[str, int]:
        return {"ticks": self.now}

    def load(self, state: dict[str, int]) -> None:
        self.now = state["ticks"]
        self.paused = False
