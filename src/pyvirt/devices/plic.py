"""SiFive Platform-Level Interrupt Controller (RISC-V PLIC specification 1.0.0).

Layout as on QEMU's virt board: priority at 4*source, pending bits at
0x1000, enable bits at 0x2000 + 0x80*context, threshold at
0x200000 + 0x1000*context and claim/complete at +4.  Contexts come in pairs
per hart: 2h is hart h's M-mode, 2h+1 its S-mode.  Gateways are
level-triggered: a source stays pending while its line is high, is taken out
of pending when claimed, and may pend again only after completion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pyvirt.devices.base import IrqLine

NUM_SOURCES = 96          # source 0 does not exist; 1..95 usable
MAX_PRIORITY = 7


class Plic:
    SIZE = 0x600000

    def __init__(self, num_harts: int, context_outputs: Sequence[Callable[[bool], None]]) -> None:
        self.num_contexts = 2 * num_harts
        if len(context_outputs) != self.num_contexts:
            raise ValueError("need one output per context (2 per hart)")
        self.outputs = list(context_outputs)
        self.levels = [False] * NUM_SOURCES
        self.reset()

    def reset(self) -> None:
        self.priority = [0] * NUM_SOURCES
        self.pending = 0
        self.claimed = 0
        self.enable = [0] * self.num_contexts
        self.threshold = [0] * self.num_contexts
        self._out = [False] * self.num_contexts
        for src, level in enumerate(self.levels):
            if level:
                self.pending |= 1 << src
        self._update()

    def irq_line(self, source: int) -> IrqLine:
        if not 1 <= source < NUM_SOURCES:
            raise ValueError(f"PLIC source {source} out of range")
        return IrqLine(lambda level: self._set_level(source, level))

    def _set_level(self, source: int, level: bool) -> None:
        self.levels[source] = level
        bit = 1 << source
        if level and not self.claimed & bit:
            self.pending |= bit
        elif not level:
            self.pending &= ~bit
        self._update()

    def _best(self, ctx: int) -> int:
        """Highest-priority pending enabled source above the threshold (0: none)."""
        cand = self.pending & self.enable[ctx] & ~self.claimed
        best, best_prio = 0, self.threshold[ctx]
        while cand:
            low = cand & -cand
            src = low.bit_length() - 1
            cand ^= low
            prio = self.priority[src]
            if prio > best_prio:
                best, best_prio = src, prio
        return best

    def _update(self) -> None:
        for ctx in range(self.num_contexts):
            level = self._best(ctx) != 0
            if level != self._out[ctx]:
                self._out[ctx] = level
                self.outputs[ctx](level)

    # -- registers ---------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 4:
            return 0
        if offset < 0x1000:
            src = offset >> 2
            return self.priority[src] if src < NUM_SOURCES else 0
        if offset < 0x1080:
            word = (offset - 0x1000) >> 2
            return (self.pending >> (32 * word)) & 0xFFFFFFFF
        if 0x2000 <= offset < 0x200000:
            ctx, word = divmod(offset - 0x2000, 0x80)
            word >>= 2
            if ctx < self.num_contexts and word < (NUM_SOURCES + 31) // 32:
                return (self.enable[ctx] >> (32 * word)) & 0xFFFFFFFF
            return 0
        if offset >= 0x200000:
            ctx, reg = divmod(offset - 0x200000, 0x1000)
            if ctx >= self.num_contexts:
                return 0
            if reg == 0:
                return self.threshold[ctx]
            if reg == 4:
                return self._claim(ctx)
        return 0

    def _claim(self, ctx: int) -> int:
        src = self._best(ctx)
        if src:
            self.claimed |= 1 << src
            self.pending &= ~(1 << src)
            self._update()
        return src

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        if offset < 0x1000:
            src = offset >> 2
            if 0 < src < NUM_SOURCES:
                self.priority[src] = value & MAX_PRIORITY
                self._update()
            return
        if 0x2000 <= offset < 0x200000:
            ctx, word = divmod(offset - 0x2000, 0x80)
            word >>= 2
            if ctx < self.num_contexts and word < (NUM_SOURCES + 31) // 32:
                mask = 0xFFFFFFFF << (32 * word)
                bits = (value << (32 * word)) & mask & ~1        # source 0 does not exist
                self.enable[ctx] = (self.enable[ctx] & ~mask) | bits
                self._update()
            return
        if offset >= 0x200000:
            ctx, reg = divmod(offset - 0x200000, 0x1000)
            if ctx >= self.num_contexts:
                return
            if reg == 0:
                self.threshold[ctx] = value & MAX_PRIORITY
                self._update()
            elif reg == 4:
                src = value
                if 0 < src < NUM_SOURCES and self.claimed >> src & 1:
                    self.claimed &= ~(1 << src)
                    if self.levels[src]:
                        self.pending |= 1 << src     # level still high: pend again
                    self._update()

    def save(self) -> dict[str, Any]:
        return {"priority": list(self.priority), "pending": self.pending, "claimed": self.claimed,
                "enable": list(self.enable), "threshold": list(self.threshold), "levels": list(self.levels)}

    def load(self, state: dict[str, Any]) -> None:
        self.priority = list(state["priority"])
        self.pending, self.claimed = state["pending"], state["claimed"]
        self.enable = list(state["enable"])
        self.threshold = list(state["threshold"])
        self.levels = list(state["levels"])
        self._out = [not v for v in [False] * self.num_contexts]
        self._update()
