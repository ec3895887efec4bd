"""The SiFive test finisher at virt's 0x100000 (QEMU "sifive_test").

Linux's syscon-poweroff and syscon-reboot drivers write 0x5555 and 0x7777;
firmware and pyvirt's /init write (code << 16) | 0x3333 to power off with an
exit status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FINISHER_FAIL, FINISHER_PASS, FINISHER_RESET = 0x3333, 0x5555, 0x7777


class Syscon:
    SIZE = 0x1000

    def __init__(self, on_event: Callable[[str, int], None]) -> None:
        self.on_event = on_event

    def reset(self) -> None:
        pass

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size < 4:
            return
        status, code = value & 0xFFFF, (value >> 16) & 0xFFFF
        if status == FINISHER_PASS:
            self.on_event("poweroff", 0)
        elif status == FINISHER_FAIL:
            self.on_event("poweroff", code)
        elif status == FINISHER_RESET:
            self.on_event("reset", 0)

    def save(self) -> dict[str, Any]:
        return {}

    def load(self, state: dict[str, Any]) -> None:
        pass
