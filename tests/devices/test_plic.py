"""SiFive PLIC through its registers: priorities, enables, thresholds, claim/complete."""

from __future__ import annotations

import pytest

from pyvirt.devices.plic import Plic

PRIO, PENDING, ENABLE, CTX = 0x0, 0x1000, 0x2000, 0x200000


class Outputs:
    def __init__(self, n: int) -> None:
        self.levels = [False] * n
        self.calls = 0

    def sinks(self):
        return [lambda v, i=i: self._set(i, v) for i in range(len(self.levels))]

    def _set(self, i: int, v: bool) -> None:
        self.calls += 1
        self.levels[i] = v


def make(harts: int = 2) -> tuple[Plic, Outputs]:
    out = Outputs(2 * harts)
    return Plic(harts, out.sinks()), out


def claim(p: Plic, ctx: int) -> int:
    return p.read(CTX + 0x1000 * ctx + 4, 4)


def complete(p: Plic, ctx: int, src: int) -> None:
    p.write(CTX + 0x1000 * ctx + 4, 4, src)


def enable(p: Plic, ctx: int, *sources: int) -> None:
    words = [0, 0, 0]
    for s in sources:
        words[s // 32] |= 1 << (s % 32)
    for w, v in enumerate(words):
        p.write(ENABLE + 0x80 * ctx + 4 * w, 4, v)


def test_priority_order_and_ties() -> None:
    p, out = make()
    lines = {s: p.irq_line(s) for s in (3, 5, 40, 41)}
    for s, prio in ((3, 1), (5, 2), (40, 2), (41, 7)):
        p.write(PRIO + 4 * s, 4, prio)
    enable(p, 1, 3, 5, 40, 41)                    # hart 0, S-mode
    for line in lines.values():
        line.raise_()
    assert out.levels == [False, True, False, False]
    assert p.read(PENDING, 4) == (1 << 3) | (1 << 5) and p.read(PENDING + 4, 4) == 0b11 << 8
    assert [claim(p, 1) for _ in range(5)] == [41, 5, 40, 3, 0]   # 5 and 40 tie: lower id first
    assert not out.levels[1]                      # everything in service


def test_level_gateway_claim_complete() -> None:
    p, out = make(1)
    line = p.irq_line(10)
    p.write(PRIO + 40, 4, 1)
    enable(p, 0, 10)
    line.raise_()
    assert out.levels[0] and claim(p, 0) == 10
    assert not out.levels[0]
    assert claim(p, 0) == 0                       # in service: not pending again before completion
    complete(p, 0, 10)                            # line still high: pends again
    assert out.levels[0] and claim(p, 0) == 10
    line.lower()
    complete(p, 0, 10)
    assert not out.levels[0] and claim(p, 0) == 0
    line.raise_()
    line.lower()                                  # withdrawn before anyone claimed it
    assert not out.levels[0] and p.read(PENDING, 4) == 0


def test_threshold_masks_output_not_claim() -> None:
    p, out = make(1)
    line = p.irq_line(7)
    p.write(PRIO + 28, 4, 3)
    enable(p, 1, 7)
    line.raise_()
    assert out.levels[1]
    p.write(CTX + 0x1000, 4, 3)                   # threshold 3: priority must exceed it
    assert not out.levels[1]
    assert p.read(CTX + 0x1000, 4) == 3
    assert claim(p, 1) == 7                       # the claim ignores the threshold
    p.write(CTX + 0x1000, 4, 0xFF)
    assert p.read(CTX + 0x1000, 4) == 7           # WARL: 3 bits


def test_priority_zero_never_interrupts() -> None:
    p, out = make(1)
    p.irq_line(2).raise_()
    enable(p, 0, 2)
    assert not out.levels[0] and claim(p, 0) == 0
    p.write(PRIO + 8, 4, 0xFFFF)
    assert p.read(PRIO + 8, 4) == 7 and out.levels[0]


def test_completion_rules() -> None:
    p, out = make(1)
    a = p.irq_line(4)
    p.write(PRIO + 16, 4, 1)
    enable(p, 0, 4)
    a.raise_()
    assert claim(p, 0) == 4
    complete(p, 1, 4)                             # not enabled for context 1: ignored
    complete(p, 0, 5)                             # not in service: ignored
    complete(p, 0, 1000)                          # no such source: ignored
    assert claim(p, 0) == 0 and not out.levels[0]
    complete(p, 0, 4)
    assert claim(p, 0) == 4


def test_contexts_per_hart() -> None:
    p, out = make(2)
    line = p.irq_line(9)
    p.write(PRIO + 36, 4, 1)
    enable(p, 2, 9)                               # hart 1, M-mode
    line.raise_()
    assert out.levels == [False, False, True, False]
    enable(p, 3, 9)
    assert out.levels == [False, False, True, True]
    assert claim(p, 3) == 9
    assert out.levels == [False, False, False, False]


def test_hostile_accesses_are_ignored() -> None:
    p, out = make(1)
    line = p.irq_line(1)
    p.write(PRIO + 4, 4, 1)
    enable(p, 0, 0, 1)                            # source 0 does not exist
    assert p.read(ENABLE, 4) == 0b10
    line.raise_()
    snapshot = p.save()
    p.write(PENDING, 4, 0)                        # pending is read-only
    p.write(PRIO + 4 * 200, 4, 5)                 # no source 200
    p.write(ENABLE + 0x80 * 7, 4, 0xFFFF_FFFF)    # no context 7
    p.write(ENABLE + 4 * 20, 4, 0xFFFF_FFFF)      # past the last source word
    p.write(CTX + 0x1000 * 9, 4, 1)               # no context 9
    p.write(CTX + 0x1000 * 9 + 4, 4, 1)
    p.write(PRIO + 4, 2, 3)                       # not a 32-bit access
    p.write(PRIO + 5, 4, 3)                       # misaligned
    p.write(Plic.SIZE - 4, 4, 0xFFFF_FFFF)
    assert p.save() == snapshot
    assert p.read(CTX + 0x1000 * 9 + 4, 4) == 0 and p.read(Plic.SIZE - 4, 4) == 0
    assert p.read(PRIO + 4, 8) == 0
    assert out.levels[0]


def test_bad_source_numbers_for_devices() -> None:
    p, _ = make(1)
    for bad in (0, 96, -1):
        with pytest.raises(ValueError):
            p.irq_line(bad)
    with pytest.raises(ValueError):
        Plic(2, [lambda v: None] * 3)


def test_save_load_and_reset() -> None:
    p, out = make(1)
    a, b = p.irq_line(3), p.irq_line(6)
    for s in (3, 6):
        p.write(PRIO + 4 * s, 4, 2)
    enable(p, 1, 3, 6)
    a.raise_()
    b.raise_()
    assert claim(p, 1) == 3
    state = p.save()
    p2, out2 = make(1)
    p2.load(state)
    assert out2.levels == out.levels == [False, True]
    assert claim(p2, 1) == 6
    complete(p2, 1, 3)                            # 3 was in service in the snapshot; line still high
    assert claim(p2, 1) == 3
    p.reset()
    assert out.levels == [False, False]
    assert p.read(PRIO + 12, 4) == 0 and p.read(PENDING, 4) == (1 << 3) | (1 << 6)  # lines still high
