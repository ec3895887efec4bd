"""The SiFive test finisher as Linux's syscon-poweroff/-reboot and /init use it."""

from __future__ import annotations

from pyvirt.devices.syscon import Syscon


def test_commands() -> None:
    events: list[tuple[str, int]] = []
    s = Syscon(lambda kind, code: events.append((kind, code)))
    s.write(0, 4, 0x5555)
    s.write(0, 4, (3 << 16) | 0x3333)
    s.write(0, 4, (255 << 16) | 0x3333)
    s.write(0, 4, 0x7777)
    assert events == [("poweroff", 0), ("poweroff", 3), ("poweroff", 255), ("reset", 0)]


def test_everything_else_ignored() -> None:
    events: list[tuple[str, int]] = []
    s = Syscon(lambda kind, code: events.append((kind, code)))
    s.write(0, 4, 0x1234)
    s.write(0, 4, 0x5554)
    s.write(4, 4, 0x5555)                         # another offset
    s.write(0, 2, 0x5555)                         # another width
    s.write(0, 1, 0x55)
    assert events == [] and s.read(0, 4) == 0
    s.reset()
    s.load(s.save())
