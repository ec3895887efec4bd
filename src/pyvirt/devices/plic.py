"""SiFive Platform-Level Interrupt Controller ("sifive,plic-1.0.0", "riscv,plic0";
RISC-V PLIC Specification 1.0.0) as QEMU's virt board lays it out::

    0x000000 + 4*s               priority of source s (1..95), 0..7; 0 = never interrupt
    0x001000 + 4*w               pending bits, sources 32w..32w+31 (read-only)
    0x002000 + 0x80*c + 4*w      enable bits of context c
    0x200000 + 0x1000*c          priority threshold of context c
    0x200004 + 0x1000*c          claim (read) / complete (write) of context c

Contexts come in pairs per hart: 2h is hart h's M-mode, 2h+1 its S-mode.
A context's output is high while some pending, enabled source has a priority
above its threshold.

Gateways are level-triggered ("Interrupt Gateways"): while a source's line is
high and it is not in service, it is pending; a claim takes it out of pending
and into service, and it may pend again only after the completion -- at once
if the line is still high.  A line that drops before being claimed withdraws
the request (as QEMU's model does).

Registers are 32 bits wide; other access widths, out-of-range sources and
contexts are ignored (reads return 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pyvirt.devices.base import IrqLine
from pyvirt.state import Schema, integer, listof, record

NUM_SOURCES = 96          # source 0 does not exist; 1..95 are usable
MAX_PRIORITY = 7
SOURCE_WORDS = (NUM_SOURCES + 31) // 32

PRIORITY_BASE = 0x000000
PENDING_BASE = 0x001000
ENABLE_BASE, ENABLE_STRIDE = 0x002000, 0x80
CONTEXT_BASE, CONTEXT_STRIDE = 0x200000, 0x1000
SOURCE_MASK = ((1 << NUM_SOURCES) - 1) & ~1


class Plic:
    SIZE = 0x600000
    NUM_SOURCES = NUM_SOURCES

    def __init__(self, num_harts: int, context_outputs: Sequence[Callable[[bool], None]]) -> None:
        self.num_contexts = 2 * num_harts
        if len(context_outputs) != self.num_contexts:
            raise ValueError(f"the PLIC needs {self.num_contexts} context outputs (2 per hart), "
                             f"got {len(context_outputs)}")
        if CONTEXT_BASE + CONTEXT_STRIDE * self.num_contexts > self.SIZE:
            raise ValueError(f"too many harts for the PLIC window: {num_harts}")
        self.outputs = list(context_outputs)
        self.levels = 0                        # input line levels, one bit per source
        self.reset()

    def reset(self) -> None:
        """All priorities, enables and thresholds 0; nothing in service.  Line levels
        are the devices' and survive; a high line pends again."""
        self.priority = [0] * NUM_SOURCES
        self.pending = self.levels
        self.claimed = 0
        self.enable = [0] * self.num_contexts
        self.threshold = [0] * self.num_contexts
        self._out = [False] * self.num_contexts
        for out in self.outputs:
            out(False)
        self._update()

    # -- the device side -------------------------------------------------------------
    def irq_line(self, source: int) -> IrqLine:
        """The input line of `source` (1..95), to hand to a device."""
        if not 1 <= source < NUM_SOURCES:
            raise ValueError(f"PLIC source {source} out of range 1..{NUM_SOURCES - 1}")
        return IrqLine(lambda level: self.set_level(source, level))

    def set_level(self, source: int, level: bool) -> None:
        bit = 1 << source
        if level:
            self.levels |= bit
            if not self.claimed & bit:
                self.pending |= bit
        else:
            self.levels &= ~bit
            self.pending &= ~bit
        self._update()

    # -- arbitration ----------------------------------------------------------------------
    def _best(self, ctx: int, floor: int) -> int:
        """The pending, enabled source with the highest priority above `floor`;
        ties go to the lowest source number.  0 if there is none."""
        cand = self.pending & self.enable[ctx]
        best, best_prio = 0, floor
        priority = self.priority
        while cand:
            low = cand & -cand
            cand ^= low
            src = low.bit_length() - 1
            if priority[src] > best_prio:
                best, best_prio = src, priority[src]
        return best

    def _update(self) -> None:
        for ctx in range(self.num_contexts):
            level = self._best(ctx, self.threshold[ctx]) != 0
            if level != self._out[ctx]:
                self._out[ctx] = level
                self.outputs[ctx](level)

    def _claim(self, ctx: int) -> int:
        """Claim ("Interrupt Claim Process"): the threshold does not filter a claim,
        priority 0 still means never."""
        src = self._best(ctx, 0)
        if src:
            self.claimed |= 1 << src
            self.pending &= ~(1 << src)
            self._update()
        return src

    def _complete(self, ctx: int, src: int) -> None:
        """Completion: ignored unless `src` is in service and enabled for `ctx`
        ("Interrupt Completion")."""
        if not 0 < src < NUM_SOURCES:
            return
        bit = 1 << src
        if not self.claimed & bit or not self.enable[ctx] & bit:
            return
        self.claimed &= ~bit
        if self.levels & bit:
            self.pending |= bit                # level still high: a new request
        self._update()

    # -- registers ----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 4 or offset & 3:
            return 0
        if offset < PENDING_BASE:
            src = offset >> 2
            return self.priority[src] if src < NUM_SOURCES else 0
        if offset < ENABLE_BASE:
            word = (offset - PENDING_BASE) >> 2
            return (self.pending >> (32 * word)) & 0xFFFFFFFF if word < SOURCE_WORDS else 0
        if offset < CONTEXT_BASE:
            ctx, off = divmod(offset - ENABLE_BASE, ENABLE_STRIDE)
            word = off >> 2
            if ctx < self.num_contexts and word < SOURCE_WORDS:
                return (self.enable[ctx] >> (32 * word)) & 0xFFFFFFFF
            return 0
        ctx, reg = divmod(offset - CONTEXT_BASE, CONTEXT_STRIDE)
        if ctx >= self.num_contexts:
            return 0
        if reg == 0:
            return self.threshold[ctx]
        if reg == 4:
            return self._claim(ctx)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 3:
            return
        value &= 0xFFFFFFFF
        if offset < PENDING_BASE:
            src = offset >> 2
            if 0 < src < NUM_SOURCES:
                self.priority[src] = value & MAX_PRIORITY
                self._update()
            return
        if offset < ENABLE_BASE:
            return                                # pending bits are read-only
        if offset < CONTEXT_BASE:
            ctx, off = divmod(offset - ENABLE_BASE, ENABLE_STRIDE)
            word = off >> 2
            if ctx < self.num_contexts and word < SOURCE_WORDS:
                shift = 32 * word
                mask = (0xFFFFFFFF << shift) & SOURCE_MASK
                self.enable[ctx] = (self.enable[ctx] & ~mask) | ((value << shift) & mask)
                self._update()
            return
        ctx, reg = divmod(offset - CONTEXT_BASE, CONTEXT_STRIDE)
        if ctx >= self.num_contexts:
            return
        if reg == 0:
            self.threshold[ctx] = value & MAX_PRIORITY
            self._update()
        elif reg == 4:
            self._complete(ctx, value)

    # -- state --------------------------------------------------------------------------------
    def state_schema(self) -> Schema:
        """What `load()` accepts (checked before it runs; pyvirt/state.py)."""
        sources = integer(0, (1 << NUM_SOURCES) - 1)
        return record({"priority": listof(integer(0, MAX_PRIORITY), NUM_SOURCES),
                       "pending": sources, "claimed": sources, "levels": sources,
                       "enable": listof(integer(0, SOURCE_MASK), self.num_contexts),
                       "threshold": listof(integer(0, MAX_PRIORITY), self.num_contexts)})

    def save(self) -> dict[str, Any]:
        return {"priority": list(self.priority), "pending": self.pending, "claimed": self.claimed,
                "enable": list(self.enable), "threshold": list(self.threshold), "levels": self.levels}

    def load(self, state: dict[str, Any]) -> None:
        self.priority = list(state["priority"])
        self.pending, self.claimed = state["pending"], state["claimed"]
        self.enable = list(state["enable"])
        self.threshold = list(state["threshold"])
        self.levels = state["levels"]
        for ctx in range(self.num_contexts):          # drive every output afresh
            level = self._best(ctx, self.threshold[ctx]) != 0
            self._out[ctx] = level
            self.outputs[ctx](level)
