"""The contracts every device model follows.

* An MMIO device answers `read(offset, size)` and `write(offset, size, value)`
  for offsets inside its window (`size` is 1, 2, 4 or 8 bytes, little-endian),
  and `reset()`.  Accesses the real hardware would ignore are ignored; reads of
  unimplemented registers return 0.  A device never raises for guest input.
* A device signals interrupts through an `IrqLine` handed to it by the
  machine; it never knows which controller or hart is behind the line.
* `save()` returns plain data (ints, bytes, str, lists, dicts) and `load()`
  restores it: that is what snapshots and migration carry.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvirt.memory import MmioDevice

__all__ = ["IrqLine", "MmioDevice"]  # MmioDevice: the bus's contract, defined beside the bus


class IrqLine:
    """A level-triggered interrupt line from a device to a controller input."""

    __slots__ = ("_sink", "level")

    def __init__(self, sink: Callable[[bool], None] | None = None) -> None:
        self._sink = sink
        self.level = False

    def set(self, level: bool) -> None:
        level = bool(level)
        if level != self.level:
            self.level = level
            if self._sink is not None:
                self._sink(level)

    def raise_(self) -> None:
        self.set(True)

    def lower(self) -> None:
        self.set(False)
