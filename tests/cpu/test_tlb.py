"""The hart's TLB bookkeeping behind ASIDs and global mappings, checked on its data
structures (the bare-metal program tests/cpu/bare/asid.c checks the behaviour on every
engine): native tags and their renumbering, the bound on kept address spaces, write
entries dropped in every address space when a page starts holding code, Sstc's STIP."""

from __future__ import annotations

from pyvirt.clock import Clock
from pyvirt.cpu.riscv import hart as hart_mod
from pyvirt.cpu.riscv import mmu, native
from pyvirt.cpu.riscv.csr import STCE, STIP, SUM
from pyvirt.cpu.riscv.hart import ASID_SETS, Hart
from pyvirt.cpu.riscv.traps import LOAD_PAGE_FAULT, STORE_PAGE_FAULT, Trap
from pyvirt.memory import Bus

RAM = 0x8000_0000
ROOT = RAM + 0x10_0000           # root table; its L1 and L0 tables follow
V, R, W, X, U, G, A, D = 1, 2, 4, 8, 16, 32, 64, 128
VA_USER = 0x4000_0000            # non-global, 4 KiB pages
VA_KERN = 0x4020_0000            # global, 4 KiB pages
PAGE = RAM + 0x20_0000           # the data pages


def pte(pa: int, flags: int) -> int:
    return (pa >> 12) << 10 | flags


def machine() -> tuple[Hart, Bus]:
    bus = Bus(RAM, 16 << 20)
    l1, l0 = ROOT + 0x1000, ROOT + 0x2000
    bus.write(ROOT + 8 * 1, 8, pte(l1, V))                     # VA 0x4000_0000 (1 GiB)
    bus.write(l1 + 8 * 0, 8, pte(l0, V))                       # 0x4000_0000 (2 MiB): user pages
    bus.write(l1 + 8 * 1, 8, pte(l0 + 0x1000, V))              # 0x4020_0000: global pages
    for i in range(8):
        bus.write(l0 + 8 * i, 8, pte(PAGE + 0x1000 * i, V | R | W | X | A | D))
        bus.write(l0 + 0x1000 + 8 * i, 8, pte(PAGE + 0x1000 * (8 + i), V | R | W | X | G | A | D))
    h = Hart(0, bus, Clock(), native_regs=True)
    h.set_priv(1)
    return h, bus


def satp(asid: int) -> int:
    return (8 << 60) | (asid << 44) | (ROOT >> 12)


def in_address_space(asid: int, access: int) -> Hart:
    """A hart in S-mode under ASID `asid` that has touched one user and one global page."""
    h, _ = machine()
    h.write_satp(satp(asid))
    h.translate(VA_USER, access)
    h.translate(VA_KERN, access)
    return h


def native_key(h: Hart, ctx: int, va: int, section: int = 0) -> int:
    vpn = va >> 12
    return h._ntlb_views[ctx][2 * native.TLB_ENTRIES * section + 2 * (vpn & (native.TLB_ENTRIES - 1))]


def test_asid_bits_are_all_writable() -> None:
    h, _ = machine()
    h.csr_op(0x180, 1, satp(0xFFFF), 5, 0, 0)
    assert h.csr_read(0x180) >> 44 & 0xFFFF == 0xFFFF


def test_entries_are_tagged_per_address_space_and_global_ones_bare() -> None:
    h = in_address_space(1, mmu.LOAD)
    tag1 = h.tagbits
    assert native_key(h, 1, VA_USER) == (VA_USER >> 12) ^ tag1
    assert native_key(h, 1, VA_KERN) == VA_KERN >> 12          # global: no tag
    h.write_satp(satp(2))
    assert h.tagbits != tag1
    assert VA_USER >> 12 not in h.rtlb                         # ASID 2's own dicts
    walks = []
    orig = mmu.walk

    def counting(*args: object) -> tuple[int, int, bool]:
        walks.append(args)
        return orig(*args)  # type: ignore[arg-type]
    mmu.walk = counting  # type: ignore[assignment]
    try:
        assert h.translate(VA_KERN + 8, mmu.LOAD) == PAGE + 0x8000 + 8
        assert not walks                                       # from the global dicts
    finally:
        mmu.walk = orig  # type: ignore[assignment]
    h.write_satp(satp(1))
    assert h.tagbits == tag1 and VA_USER >> 12 in h.rtlb       # ASID 1's entries kept


def test_flush_asid_retags_and_keeps_globals() -> None:
    h = in_address_space(1, mmu.STORE)
    old = h.tagbits
    h.sfence_vma(0, 0, 0, 10, 1)                               # sfence.vma x0, a0=1
    assert h.tagbits != old and not h.rtlb
    assert native_key(h, 1, VA_KERN, 1) == VA_KERN >> 12      # the global write entry stays
    h.sfence_vma(5, VA_KERN, 0)                                # sfence.vma va, x0
    assert native_key(h, 1, VA_KERN, 1) == hart_mod.M64


def test_tags_run_out_and_are_renumbered() -> None:
    h, _ = machine()
    h.write_satp(satp(1))
    h.write_satp(satp(2))
    for _ in range(native.TAG_LIMIT + 10):
        h.flush_asid(1)
        h.translate(VA_USER, mmu.LOAD)
    tags = [e[0] for e in h.asid_sets.values()]
    assert len(set(tags)) == len(tags) and 0 not in tags and max(tags) < native.TAG_LIMIT
    assert h.tagbits == h.asid_sets[2][0] << native.TAG_SHIFT
    assert native_key(h, 1, VA_USER) == (VA_USER >> 12) ^ h.tagbits


def test_least_recently_used_address_space_goes() -> None:
    h, _ = machine()
    for asid in range(1, ASID_SETS + 3):
        h.write_satp(satp(asid))
        h.translate(VA_USER, mmu.LOAD)
    assert len(h.asid_sets) == ASID_SETS
    assert 1 not in h.asid_sets and 2 not in h.asid_sets
    live = {e[0] for e in h.asid_sets.values()}
    h.write_satp(satp(1))                                      # comes back with a new tag
    assert h.asid_sets[1][0] not in live and not h.rtlb


def test_page_becoming_code_loses_write_entries_in_every_address_space() -> None:
    h, _ = machine()
    for asid in (1, 2):
        h.write_satp(satp(asid))
        h.translate(VA_USER, mmu.STORE)
        h.translate(VA_KERN, mmu.STORE)
    h.drop_write_mapping(PAGE >> 12)
    h.drop_write_mapping((PAGE + 0x8000) >> 12)
    for entry in h.asid_sets.values():
        assert VA_USER >> 12 not in entry[1][1][1] and VA_KERN >> 12 not in entry[1][1][1]
    assert VA_KERN >> 12 not in h.gtlbs[1][1]
    assert native_key(h, 1, VA_USER, 1) == hart_mod.M64
    assert native_key(h, 1, VA_KERN, 1) == hart_mod.M64
    assert VA_USER >> 12 in h.rtlb                             # reads stay


def test_native_tlb_memory_per_hart() -> None:
    """Four contexts of read, write and fetch tables: 768 KiB per hart at 4096 entries."""
    h, _ = machine()
    total = sum(len(memoryview(t).cast("B")) for t in h._ntlb.values())
    assert total == 4 * 3 * native.TLB_BYTES <= 1 << 20


def test_sstc_drives_stip() -> None:
    h, _ = machine()
    h.set_priv(3)
    h.mcounteren = 2
    h.csr_op(0x14D, 1, 0, 5, 0, 0)                             # M may always write it
    assert not h.mip & STIP                                    # without STCE: no comparator
    h.menvcfg = STCE
    h.csr_op(0x14D, 1, 0, 5, 0, 0)
    assert h.mip & STIP
    h.csr_op(0x344, 3, STIP, 5, 0, 0)                          # read-only in mip with STCE
    assert h.csr_read(0x344) & STIP
    h.csr_op(0x14D, 1, hart_mod.M64, 5, 0, 0)
    assert not h.mip & STIP
    h.set_priv(1)
    h.csr_op(0x14D, 1, h.clock.ticks() + 10**9, 5, 0, 0)       # from S with STCE and TM
    assert not h.mip & STIP
    assert h.csr_read(0x14D) > h.clock.ticks()


class Regs:
    """A device whose registers read back its name and count the accesses."""

    def __init__(self, tag: int) -> None:
        self.tag, self.reads, self.writes = tag, 0, []

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return self.tag + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, value))


DEV_A, DEV_B = 0x1000_0000, 0x1000_1000
VA_DEV = VA_USER + 0x8000          # the user table's slot after its eight RAM pages


def with_device(flags: int) -> tuple[Hart, Bus, Regs, Regs, int]:
    h, bus = machine()
    a, b = Regs(0x100), Regs(0x200)
    bus.add_mmio(DEV_A, 0x1000, a, "a")
    bus.add_mmio(DEV_B, 0x1000, b, "b")
    slot = ROOT + 0x2000 + 8 * ((VA_DEV >> 12) & 511)
    bus.write(slot, 8, pte(DEV_A, flags))
    h.write_satp(satp(1))
    return h, bus, a, b, slot


def counting_walks() -> tuple[list[object], object]:
    walks: list[object] = []
    orig = mmu.walk

    def counting(*args: object) -> tuple[int, int, bool]:
        walks.append(args)
        return orig(*args)  # type: ignore[arg-type]
    mmu.walk = counting  # type: ignore[assignment]
    return walks, orig


def test_device_pages_are_walked_once_until_sfence() -> None:
    h, bus, a, b, slot = with_device(V | R | W | A | D)
    walks, orig = counting_walks()
    try:
        assert h.mem_load(VA_DEV + 4, 4, False) == 0x104
        h.mem_store(VA_DEV + 8, 4, 7)
        assert len(walks) == 2                                 # one for loads, one for stores
        for _ in range(3):
            assert h.mem_load(VA_DEV + 4, 4, False) == 0x104
            h.mem_store(VA_DEV + 8, 4, 7)
        assert len(walks) == 2 and a.reads == 4 and len(a.writes) == 4
        bus.write(slot, 8, pte(DEV_B, V | R | W | A | D))     # remapped, not yet fenced
        h.sfence_vma(1, VA_DEV, 0)
        assert h.mem_load(VA_DEV + 4, 4, False) == 0x204       # the new page after sfence.vma
        h.write_satp(satp(2))                                  # another address space walks
        n = len(walks)
        assert h.mem_load(VA_DEV + 4, 4, False) == 0x204 and len(walks) == n + 1
    finally:
        mmu.walk = orig  # type: ignore[assignment]


def test_device_page_held_for_loads_does_not_let_a_store_through() -> None:
    h, _, a, _, _ = with_device(V | R | A)                     # read-only
    assert h.mem_load(VA_DEV, 4, False) == 0x100
    try:
        h.mem_store(VA_DEV, 4, 1)
    except Trap as t:
        assert t.cause == STORE_PAGE_FAULT
    else:
        raise AssertionError("a store to a read-only device page went through")
    assert a.writes == []


def test_device_page_of_user_mode_needs_sum_again_after_sum_goes() -> None:
    h, _, _, _, _ = with_device(V | R | W | U | A | D)
    h.mstatus |= SUM
    h.set_priv(1)
    assert h.mem_load(VA_DEV, 4, False) == 0x100               # S with SUM reaches a user page
    h.mstatus &= ~SUM
    h.set_priv(1)
    try:
        h.mem_load(VA_DEV, 4, False)
    except Trap as t:
        assert t.cause == LOAD_PAGE_FAULT
    else:
        raise AssertionError("S-mode read a user device page without SUM")
