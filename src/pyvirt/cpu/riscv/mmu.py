"""Sv39 / Sv48 address translation (privileged spec 1.12, sections 4.3-4.5).

`walk()` translates one virtual address for one access type and privilege,
updating the A and D bits of the leaf PTE in guest memory as the hardware
(Svadu-style) page-table walker does.  The hart caches the result per 4 KiB
page in its software TLB.
"""

from __future__ import annotations

from pyvirt.cpu.riscv.traps import (
    INSN_ACCESS_FAULT,
    INSN_PAGE_FAULT,
    LOAD_ACCESS_FAULT,
    LOAD_PAGE_FAULT,
    STORE_ACCESS_FAULT,
    STORE_PAGE_FAULT,
    Trap,
)
from pyvirt.memory import Bus, BusError

FETCH, LOAD, STORE = 0, 1, 2
PAGE_FAULT = (INSN_PAGE_FAULT, LOAD_PAGE_FAULT, STORE_PAGE_FAULT)
ACCESS_FAULT = (INSN_ACCESS_FAULT, LOAD_ACCESS_FAULT, STORE_ACCESS_FAULT)

PTE_V, PTE_R, PTE_W, PTE_X, PTE_U, PTE_G, PTE_A, PTE_D = (1 << i for i in range(8))

SATP_BARE, SATP_SV39, SATP_SV48 = 0, 8, 9
LEVELS = {SATP_SV39: 3, SATP_SV48: 4}

PRIV_U, PRIV_S, PRIV_M = 0, 1, 3


def walk(bus: Bus, mode: int, root_ppn: int, va: int, access: int, priv: int,
         sum_: bool, mxr: bool) -> tuple[int, int, bool]:
    """Translate `va`; returns (physical address, superpage level or 0, global).

    The mapping is global when a PTE on its path has the G bit (4.3.1: a global
    non-leaf PTE makes every mapping below it global).

    Raises a page fault or access fault `Trap` with tval = va.
    """
    levels = LEVELS[mode]
    va_bits = 12 + 9 * levels
    top = va >> (va_bits - 1)
    if top != 0 and top != (1 << (65 - va_bits)) - 1:
        raise Trap(PAGE_FAULT[access], va)
    table = root_ppn << 12
    level = levels - 1
    glob = 0
    while True:
        pte_addr = table + ((va >> (12 + 9 * level)) & 511) * 8
        try:
            pte = bus.read(pte_addr, 8)
        except BusError:
            raise Trap(ACCESS_FAULT[access], va) from None
        if not pte & PTE_V or (pte & (PTE_R | PTE_W)) == PTE_W or pte >> 54:
            # Invalid, write-only (reserved) or reserved high bits (N, PBMT:
            # Svnapot and Svpbmt are not implemented).
            raise Trap(PAGE_FAULT[access], va)
        glob |= pte & PTE_G
        if pte & (PTE_R | PTE_X):
            break
        if level == 0 or pte & (PTE_A | PTE_D | PTE_U):
            raise Trap(PAGE_FAULT[access], va)
        level -= 1
        table = ((pte >> 10) & ((1 << 44) - 1)) << 12
    # Leaf: permission checks (4.3.2 step 5).
    if pte & PTE_U:
        if priv == PRIV_S and (access == FETCH or not sum_):
            raise Trap(PAGE_FAULT[access], va)
    elif priv == PRIV_U:
        raise Trap(PAGE_FAULT[access], va)
    if access == FETCH:
        ok = pte & PTE_X
    elif access == LOAD:
        ok = pte & PTE_R or (mxr and pte & PTE_X)
    else:
        ok = pte & PTE_W
    if not ok:
        raise Trap(PAGE_FAULT[access], va)
    ppn = (pte >> 10) & ((1 << 44) - 1)
    if level and ppn & ((1 << (9 * level)) - 1):
        raise Trap(PAGE_FAULT[access], va)   # misaligned superpage
    want = PTE_A | (PTE_D if access == STORE else 0)
    if pte & want != want:
        try:
            bus.write(pte_addr, 8, pte | want)
        except BusError:
            raise Trap(ACCESS_FAULT[access], va) from None
    offset_mask = (1 << (12 + 9 * level)) - 1
    return ((ppn << 12) & ~offset_mask) | (va & offset_mask), level, bool(glob)
