"""Guest traps and the control exceptions of the execution engine.

Guest-visible events are values of their own hierarchy, separate from host
errors (pyvirt.errors).  Privileged spec 1.12, section 3.1.15 (mcause) lists
the codes.
"""

from __future__ import annotations

# Exception codes (mcause/scause with the interrupt bit clear).
INSN_MISALIGNED = 0
INSN_ACCESS_FAULT = 1
ILLEGAL_INSN = 2
BREAKPOINT = 3
LOAD_MISALIGNED = 4
LOAD_ACCESS_FAULT = 5
STORE_MISALIGNED = 6
STORE_ACCESS_FAULT = 7
ECALL_FROM_U = 8
ECALL_FROM_S = 9
ECALL_FROM_M = 11
INSN_PAGE_FAULT = 12
LOAD_PAGE_FAULT = 13
STORE_PAGE_FAULT = 15

# Interrupt codes (the interrupt bit set in mcause).
IRQ_S_SOFT = 1
IRQ_M_SOFT = 3
IRQ_S_TIMER = 5
IRQ_M_TIMER = 7
IRQ_S_EXT = 9
IRQ_M_EXT = 11

INTERRUPT_BIT = 1 << 63


class Trap(Exception):  # noqa: N818 - a trap is not an error of the host
    """A synchronous exception or an interrupt to deliver to the guest.

    When it is raised, `hart.pc` holds the value for xepc: the faulting
    instruction for exceptions, the next instruction for an interrupt taken
    right after a CSR write enabled it.
    """

    __slots__ = ("cause", "tval")

    def __init__(self, cause: int, tval: int = 0) -> None:
        self.cause = cause
        self.tval = tval

    @property
    def is_interrupt(self) -> bool:
        return bool(self.cause & INTERRUPT_BIT)

    def __repr__(self) -> str:
        return f"Trap(cause={self.cause:#x}, tval={self.tval:#x})"


class ContextChange(Exception):  # noqa: N818
    """Privilege mode or translation context changed: the engine reloads its
    per-mode caches and continues at `hart.pc`."""


class StopSlice(Exception):  # noqa: N818
    """Stop running this hart now (WFI, hart stop, power-off); resume at `hart.pc`."""
