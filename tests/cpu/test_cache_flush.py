"""A full translation cache is emptied (or, at MAX_BLOCKS, its addresses forgotten) and the
guest runs on, on every engine."""

from __future__ import annotations

import pytest

from pyvirt.cpu.riscv import engine as engine_mod
from pyvirt.testing import asm


def test_small_cache_flushes_and_results_match_qemu(check_user, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten functions called in turn, 40 rounds, with room for only a few blocks: the cache
    fills and empties over and over (native code buffers included) while the sum stays right."""
    monkeypatch.setattr(engine_mod, "MAX_BLOCKS", 6)
    monkeypatch.setattr(engine_mod, "MAX_NATIVE_CODE", 2048)
    funcs = "".join(f"f{i}:\n    addi s2, s2, {i + 1}\n    slli t0, s2, {i % 5}\n    xor s3, s3, t0\n    ret\n"
                    for i in range(10))
    calls = "".join(f"    call f{i}\n" for i in range(10))
    body = f"""
    li s2, 0
    li s3, 0
    li s4, 40
1:
{calls}    addi s4, s4, -1
    bnez s4, 1b
    j 2f
{funcs}2:
    """
    r = check_user(asm.user_program(body, seed=83))
    assert r.regs[18] == 40 * 55
    if engine[0] != "interp" or engine[1] > 1:
        assert r.engine_stats["flushes"] + r.engine_stats["forgets"] > 10, r.engine_stats
    if engine[0] == "native":
        # the code buffer's bound (native blocks chain to one another by physical address,
        # so the loop returns to Python, and builds, less often than the other engines)
        assert r.engine_stats["flushes"] >= 4, r.engine_stats
