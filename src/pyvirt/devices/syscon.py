"""The SiFive test finisher ("sifive,test0"/"sifive,test1", QEMU's "sifive_test") at
virt's 0x100000, exposed to Linux as a "syscon" regmap.

One 32-bit register at offset 0; writes are commands, reads return 0::

    0x5555                  FINISHER_PASS  power off, exit status 0
                                           (Linux syscon-poweroff's value)
    0x7777                  FINISHER_RESET reset the machine
                                           (Linux syscon-reboot's value)
    (code << 16) | 0x3333   FINISHER_FAIL  power off with exit status `code`

Any other value is ignored, as are writes of other widths or offsets.  The
device only reports: `on_event(kind, code)` with kind "poweroff" or
"reset"; stopping the machine is the VMM's business.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyvirt.state import Schema, record

FINISHER_FAIL, FINISHER_PASS, FINISHER_RESET = 0x3333, 0x5555, 0x7777


class Syscon:
    SIZE = 0x1000

    def __init__(self, on_event: Callable[[str, int], None]) -> None:
        self.on_event = on_event

    def reset(self) -> None:
        pass                             # stateless

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 4:
            return
        status, code = value & 0xFFFF, (value >> 16) & 0xFFFF
        if status == FINISHER_PASS:
            self.on_event("poweroff", 0)
        elif status == FINISHER_FAIL:
            self.on_event("poweroff", code)
        elif status == FINISHER_RESET:
            self.on_event("reset", 0)

    def state_schema(self) -> Schema:
        """What `load()` accepts: nothing (pyvirt/state.py)."""
        return record({})

    def save(self) -> dict[str, Any]:
        return {}

    def load(self, state: dict[str, Any]) -> None:
        pass
