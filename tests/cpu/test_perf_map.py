"""PYVIRT_PERF_MAP: native blocks named in /tmp/perf-PID.map for `perf report`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvirt.clock import Clock
from pyvirt.cpu.riscv import native
from pyvirt.cpu.riscv.engine import Engine
from pyvirt.cpu.riscv.hart import Hart
from pyvirt.memory import Bus

pytestmark = pytest.mark.skipif(not native.available(), reason="the native engine needs an x86-64 host")
BASE = 0x8000_0000


def _run(monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setenv("PYVIRT_PERF_MAP", "1")
    bus = Bus(BASE, 1 << 20)
    bus.write(BASE, 4, 1 << 20 | 5 << 15 | 5 << 7 | 0x13)       # addi x5, x5, 1
    bus.write(BASE + 4, 4, 0xFFDFF06F)                          # jal x0, -4
    eng = Engine(bus, "native")
    h = Hart(0, bus, Clock(), native_regs=True)
    eng.add_hart(h)
    h.pc = BASE
    eng.run(h, 100)
    return eng


def test_each_native_block_is_named_with_its_code_range(monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(f"/tmp/perf-{os.getpid()}.map")
    path.unlink(missing_ok=True)
    try:
        eng = _run(monkeypatch)
        assert eng.perf_map is not None
        lines = [line.split() for line in path.read_text().splitlines()]
        assert lines and all(len(f) == 3 for f in lines)
        names = {f[2] for f in lines}
        assert f"g_3_{BASE:x}" in names
        assert eng.native is not None
        assert sum(int(f[1], 16) for f in lines) == eng.native.stats["native_bytes"]
    finally:
        path.unlink(missing_ok=True)


def test_an_unwritable_map_is_a_warning_not_a_failure(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    def refuse(*args: object, **kw: object) -> None:
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("builtins.open", refuse)
    eng = _run(monkeypatch)
    assert eng.perf_map is None and "perf map" in caplog.text
