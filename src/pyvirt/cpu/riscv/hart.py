"""One RV64GC hart: architectural state, traps, interrupts and the memory slow path.

Translated code reaches RAM through the software TLB (three dicts per
privilege mode: read, write, fetch) mapping a virtual page number to the
offset that turns a virtual address into an index of the RAM buffer.  Misses,
MMIO, watched pages and page-crossing accesses come here.

The TLB keeps the entries of several address spaces (ASIDs, satp.ASID) and
global mappings (PTE.G) apart: each ASID seen recently has its own set of
dicts, the current one is `tlbs`; global mappings are also kept in `gtlbs`
and copied into an address space's dicts on a miss, without a page walk.
A satp write switches sets and flushes nothing; `sfence.vma` drops what it
names.  The native tables are shared: entries carry the tag of their ASID's
set (or none, when global), see native.TAG_SHIFT.
"""

from __future__ import annotations

import ctypes
import sys
from collections import OrderedDict
from collections.abc import Callable
from struct import Struct
from typing import Any

from pyvirt.clock import Clock
from pyvirt.cpu.riscv import mmu, native
from pyvirt.cpu.riscv.csr import (
    FS,
    MIE,
    MPIE,
    MPP,
    MPP_SHIFT,
    MPRV,
    MXR,
    SIE,
    SPIE,
    SPP,
    STIP,
    SUM,
    TSR,
    TVM,
    TW,
    CsrMixin,
)
from pyvirt.cpu.riscv.traps import (
    ECALL_FROM_U,
    ILLEGAL_INSN,
    INSN_ACCESS_FAULT,
    INTERRUPT_BIT,
    LOAD_ACCESS_FAULT,
    LOAD_MISALIGNED,
    STORE_ACCESS_FAULT,
    STORE_MISALIGNED,
    ContextChange,
    StopSlice,
    Trap,
)
from pyvirt.memory import Bus, BusError
from pyvirt.state import U64, Schema, boolean, integer, listof, one_of, record

M64 = (1 << 64) - 1
TLB_LIMIT = 8192          # entries in one TLB dict before its address space starts again
GLOBAL_LIMIT = 4 * TLB_LIMIT
IO_TLB_LIMIT = 256        # device pages held for loads and stores (Hart.io_tlb)
# Interrupt priority order (3.1.9): MEI, MSI, MTI, SEI, SSI, STI.
_PRIORITY = (11, 3, 7, 9, 1, 5)
_SEXT = {1: (0x80, 0x100), 2: (0x8000, 0x10000), 4: (0x80000000, 1 << 32), 8: (1 << 63, 1 << 64)}
_AMO_MASK = {4: 0xFFFFFFFF, 8: M64}
_UNPACK = {n: Struct(f).unpack_from for n, f in ((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q"))}
_PACK = {n: Struct(f).pack_into for n, f in ((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q"))}

HART_STARTED, HART_STOPPED, HART_START_PENDING = 0, 1, 2
S_SUM = 2          # the TLB context of S-mode with mstatus.SUM set
SU_CTX = (0, 1, S_SUM)
ASIDLEN = 16       # satp.ASID bits that are writable (all of Sv39/Sv48's 16)
ASID_MASK = (1 << ASIDLEN) - 1
ASID_SETS = 16     # address spaces whose TLB entries are kept at once (least recently used goes)
WREV_LIMIT = 1 << 16
_DICT_OF = {mmu.FETCH: 2, mmu.LOAD: 0, mmu.STORE: 1}   # access -> index in (read, write, fetch)


def _su_dicts(mdicts: tuple[dict[int, int], ...]) -> dict[int, tuple[dict[int, int], ...]]:
    """A fresh set of U / S / S-with-SUM TLB dicts (S_SUM shares S's fetch dict), with M's."""
    s: dict[int, tuple[dict[int, int], ...]] = {0: ({}, {}, {}), 1: ({}, {}, {})}
    s[S_SUM] = ({}, {}, s[1][2])
    s[3] = mdicts
    return s


def _sext(v: int, size: int) -> int:
    sign, span = _SEXT[size]
    return (v - span) & M64 if v & sign else v


def _state_word(index: int, signed: bool = False) -> Any:
    """A Hart attribute kept in word `index` of the native state buffer."""
    if signed:
        def get(self: Hart) -> int:
            return self.sq[index]

        def set_(self: Hart, v: int) -> None:
            self.sq[index] = v
    else:
        def get(self: Hart) -> int:
            return self._uq[index]

        def set_(self: Hart, v: int) -> None:
            self._uq[index] = v
    return property(get, set_)


def _no_rechain(h: Hart, pc: int) -> None:
    pass


_CLOCK_GETTIME = native.clock_gettime_address() if native.available() else 0


class Hart(CsrMixin):
    __slots__ = (
        "hartid", "bus", "clock", "ram", "ram_base", "ram_end",
        "x", "f", "pc", "priv", "fflags", "frm",
        "medeleg", "mideleg", "mtvec", "stvec",
        "mscratch", "mepc", "mcause", "mtval",
        "mcountinhibit", "menvcfg", "senvcfg", "pmp",
        "instret", "adj", "idle", "state", "stimecmp",
        "tlbs", "rtlb", "wtlb", "itlb", "superpages", "ctx",
        "gtlbs", "asid_sets", "cur_set", "tagbits", "next_tag", "_wrev", "_wrev_n", "_su_all",
        "ecall_hook", "yield_on_pause",
        "_state", "sq", "_uq", "_as_parameter_", "_ntlb", "_ntlb_views", "_ram_host", "native_exit_hook",
        "rechain_hook",
        "jump_tables", "_sptab", "_walk", "_fetch_walk",
    )

    def __init__(self, hartid: int, bus: Bus, clock: Clock, native_regs: bool = False) -> None:
        self.hartid = hartid
        self.bus = bus
        self.clock = clock
        self.ram = bus.ram
        self.ram_base = bus.ram_base
        self.ram_end = bus.ram_end
        # ecall_hook(hart) -> bool: serves ecalls the VMM implements itself
        # (the SBI for an S-mode kernel, system calls for user-mode tests).
        self.ecall_hook: Callable[[Hart], bool] | None = None
        # Set when other harts may hold what this one spins on.
        self.yield_on_pause = False
        # TLB contexts: 0 U, 1 S with SUM=0, 2 S with SUM=1 (user pages allowed;
        # it shares S's fetch dict), 3 M.  The kernel toggles SUM around every
        # copy to or from user memory: switching context keeps both sets warm.
        # Per ASID: [native tag, {context: (read, write, fetch)}] (M's dicts shared),
        # most recently used last.
        mdicts: tuple[dict[int, int], ...] = ({}, {}, {})
        self.tlbs = _su_dicts(mdicts)
        self.cur_set: list[Any] = [1, self.tlbs]
        self.asid_sets: OrderedDict[int, list[Any]] = OrderedDict({0: self.cur_set})
        self.gtlbs = _su_dicts(mdicts)           # global mappings ([3] unused)
        # Device pages (outside RAM) the page walk mapped for loads and stores, which the
        # TLB dicts do not hold: (vpn, access, privilege, satp, SUM|MXR) -> physical page.
        # A driver's register accesses (a network interrupt reads and writes four) would
        # each walk the page table again.  Emptied by every sfence.vma as the TLB is.
        self.io_tlb: dict[tuple[int, int, int, int, int], int] = {}
        self.tagbits = 1 << native.TAG_SHIFT
        self.next_tag = 2
        # Reverse map for drop_write_mapping: physical page -> [(write dict, vpn)]
        # of the S/U write entries made (stale ones are checked and skipped).
        self._wrev: dict[int, list[tuple[dict[int, int], int]]] = {}
        self._wrev_n = 0
        self._su_all: list[dict[int, int]] | None = None    # every S/U dict, see _all_dicts
        self.ctx = 0
        self.superpages: set[int] = set()
        # For the native tier (native.py) the integer registers live in a native
        # buffer and `x` is a 64-bit view of its first 32 words; the Python
        # tiers alone are faster with a list.
        self._state = (ctypes.c_uint64 * native.STATE_WORDS)()
        raw = memoryview(self._state).cast("B")
        self.x = raw.cast("Q")[:32] if native_regs else [0] * 32
        self.sq = raw.cast("q")
        self._uq = raw.cast("Q")
        self._as_parameter_ = ctypes.addressof(self._state)    # what ctypes passes for `hart`
        # Native TLB tables per privilege: reads then writes, (vpn, addend) pairs,
        # then fetches, (vpn, ppn) pairs.
        self._ntlb = {p: (ctypes.c_uint64 * (6 * native.TLB_ENTRIES))() for p in (0, 1, S_SUM, 3)}
        self.jump_tables: native.JumpTables | None = None
        self._ntlb_views = {p: memoryview(t).cast("B").cast("Q") for p, t in self._ntlb.items()}
        # Superpages TLB entries came from, for sfence.vma va: `superpages` (translate's)
        # and this table of their numbers (native.sp_slot), where the native walk records
        # the ones it fills from and translate too while a slot is free (a number is
        # in one or the other, or both).  The native walk declines a superpage whose
        # slot holds another.
        self._sptab = (ctypes.c_uint64 * native.SP_ENTRIES)()
        # The routines native code calls on a TLB miss: read, write, fetch (Engine.add_hart
        # picks them), and the C entry `translate` calls for a fetch, or None.
        self._walk = (0, 0, 0)
        self._fetch_walk: Callable[[int, int], int] | None = None
        if native.available():
            decline = native.walker().addr["decline"]
            self._walk = (decline, decline, decline)
        self._ram_host = ctypes.addressof(ctypes.c_char.from_buffer(bus.ram))
        self.native_exit_hook: Callable[[Hart, int], int] | None = None
        # Native code could not chain to a block and returned to Python: the engine puts
        # back what the chaining stub looks at (Engine._rechain)
        self.rechain_hook: Callable[[Hart, int], None] = _no_rechain
        self.reset()

    # mstatus, mip, mie, the stored-only S CSRs and the LR reservation live in
    # the native state buffer, where native code reads and updates them.
    mstatus = _state_word(native.W_MSTATUS)
    mip = _state_word(native.W_MIP)
    mie = _state_word(native.W_MIE)
    sscratch = _state_word(native.W_SSCRATCH)
    sepc = _state_word(native.W_SEPC)
    scause = _state_word(native.W_SCAUSE)
    stval = _state_word(native.W_STVAL)
    satp = _state_word(native.W_SATP)
    resv = _state_word(native.W_RESV, signed=True)     # a RAM offset, or -1
    mcounteren = _state_word(native.W_MCOUNTEREN)      # (native rdtime checks TM)
    scounteren = _state_word(native.W_SCOUNTEREN)

    # -- state ------------------------------------------------------------------
    def reset(self) -> None:
        for i in range(native.STATE_WORDS):
            self._state[i] = 0
        self._state[native.W_RAM] = self._ram_host
        self._state[native.W_TLB_S0] = ctypes.addressof(self._ntlb[1])
        self._state[native.W_TLB_S1] = ctypes.addressof(self._ntlb[S_SUM])
        self._state[native.W_TAG] = self.tagbits
        self._state[native.W_RAMBASE] = self.ram_base
        self._state[native.W_RAMSIZE] = self.ram_end - self.ram_base
        self._state[native.W_PFLAGS] = self.bus.page_flags_address
        self._state[native.W_SPTAB] = ctypes.addressof(self._sptab)
        self._state[native.W_WALK_R], self._state[native.W_WALK_W], self._state[native.W_WALK_X] = self._walk
        self._state[native.W_TIME_FN] = _CLOCK_GETTIME
        for i in range(32):
            self.x[i] = 0
        self.f = [0] * 32
        self.pc = 0
        self.fflags = 0
        self.frm = 0
        self.mstatus = 0
        self.medeleg = self.mideleg = self.mie = self.mip = 0
        self.mtvec = self.stvec = self.mscratch = self.sscratch = 0
        self.mepc = self.sepc = self.mcause = self.scause = self.mtval = self.stval = 0
        self.satp = 0
        self.mcounteren = self.scounteren = self.mcountinhibit = 0
        self.menvcfg = self.senvcfg = 0
        self.pmp = [0] * 80
        self.instret = 0
        self.adj = 0
        self.resv = -1
        self.idle = False
        self.state = HART_STARTED
        self.stimecmp = M64
        self.flush_tlb(all_modes=True)
        self.set_priv(3)

    _SAVED = ("pc", "priv", "fflags", "frm", "mstatus", "medeleg", "mideleg", "mie", "mip",
              "mtvec", "stvec", "mscratch", "sscratch", "mepc", "sepc", "mcause", "scause",
              "mtval", "stval", "satp", "mcounteren", "scounteren", "mcountinhibit", "menvcfg",
              "senvcfg", "instret", "idle", "state", "stimecmp")

    def save(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: getattr(self, k) for k in self._SAVED}
        state.update(x=list(self.x), f=list(self.f), pmp=list(self.pmp), resv=self.resv)
        return state

    def load(self, state: dict[str, Any]) -> None:
        for k in self._SAVED:
            setattr(self, k, state[k])
        for i, v in enumerate(state["x"]):
            self.x[i] = v
        self.f[:] = state["f"]
        self.pmp[:] = state["pmp"]
        self.resv = state.get("resv", -1)
        self.flush_tlb(all_modes=True)
        self.set_priv(state["priv"])

    def state_schema(self) -> Schema:
        """What `load()` accepts (checked before it runs; pyvirt/state.py): the WARL rules
        the CPU relies on (no reserved privilege, MPP, satp mode or trap-vector mode) and
        the reservation inside RAM.  A field added to `save()` is added here too."""
        def mstatus_rule(v: int) -> str | None:
            return "MPP is the reserved value 2" if (v & MPP) >> MPP_SHIFT == 2 else None

        def satp_rule(v: int) -> str | None:
            return None if v >> 60 in (0, 8, 9) else f"unsupported satp mode {v >> 60}"

        def tvec_rule(v: int) -> str | None:
            return "reserved trap-vector mode" if v & 2 else None

        fields: dict[str, Schema] = {k: U64 for k in (
            "pc", "medeleg", "mideleg", "mie", "mip", "mscratch", "sscratch", "mepc", "sepc",
            "mcause", "scause", "mtval", "stval", "mcounteren", "scounteren", "mcountinhibit",
            "menvcfg", "senvcfg", "instret", "stimecmp")}
        fields.update(
            priv=one_of(0, 1, 3), fflags=integer(0, 0x1F), frm=integer(0, 7),
            mstatus=integer(0, M64, mstatus_rule), satp=integer(0, M64, satp_rule),
            mtvec=integer(0, M64, tvec_rule), stvec=integer(0, M64, tvec_rule),
            idle=boolean, state=one_of(0, 1, 2),
            x=listof(U64, 32), f=listof(U64, 32), pmp=listof(U64, 80),
            resv=integer(-1, self.bus.ram_size - 1))
        return record(fields)

    # -- privilege and TLB -------------------------------------------------------
    def set_walker(self, on: bool, mutation: str | None = None, fetch: bool = True) -> None:
        """Whether native code refills its TLB with the native page walk (native.walk_code),
        or leaves every miss to `translate`; and with `fetch` (and `on`), whether `translate`
        walks for an instruction fetch with it before mmu.walk."""
        w = native.walker(mutation)
        dec = w.addr["decline"]
        self._walk = (w.addr["load"], w.addr["store"], w.addr["fetch"] if fetch else dec) if on else (dec,) * 3
        self._state[native.W_WALK_R], self._state[native.W_WALK_W], self._state[native.W_WALK_X] = self._walk
        self._fetch_walk = w.fetch if on and fetch else None

    def tlb_bytes(self) -> dict[str, int]:
        """Host memory of this hart's TLB: the native tables and the Python dicts (their
        hash tables, not the int objects they share with the rest of the process)."""
        dicts: dict[int, dict[int, int]] = {id(d): d for d in self._all_dicts()}
        for d in self.tlbs[3]:
            dicts[id(d)] = d
        return {"native tables": sum(ctypes.sizeof(t) for t in self._ntlb.values()) + ctypes.sizeof(self._sptab),
                "python dicts": sum(sys.getsizeof(d) for d in dicts.values()),
                "python entries": sum(len(d) for d in dicts.values())}

    def set_clock_words(self, offset_ns: int, ns_per_tick: int) -> None:
        """What native rdtime reads (Clock.native_params), set before native code runs."""
        st = self._state
        st[native.W_CLK_OFF] = offset_ns & native.M64
        st[native.W_CLK_DIV] = ns_per_tick

    def set_priv(self, priv: int) -> None:
        self.priv = priv
        self._state[native.W_PRIV] = priv
        ctx = S_SUM if priv == 1 and self.mstatus & SUM else priv
        self.ctx = ctx
        self.rtlb, self.wtlb, self.itlb = self.tlbs[ctx]
        base = ctypes.addressof(self._ntlb[ctx])
        st = self._state
        st[native.W_TLB_R] = base
        st[native.W_TLB_W] = base + native.TLB_BYTES
        st[native.W_TLB_X] = ctypes.addressof(self._ntlb[priv]) + 2 * native.TLB_BYTES
        if self.jump_tables is not None:
            st[native.W_JMP] = self.jump_tables.address(priv)

    def _native_clear(self, priv: int, fetch: bool = True) -> None:
        """Invalidate the native TLB tables of `priv`: reads and writes, and fetches
        unless `fetch` is false (the fetch table mirrors the `itlb` dict)."""
        ctypes.memset(self._ntlb[priv], 0xFF, (3 if fetch else 2) * native.TLB_BYTES)

    def _apply_tag(self) -> None:
        self.tagbits = self.cur_set[0] << native.TAG_SHIFT
        self._state[native.W_TAG] = self.tagbits

    def _new_tag(self) -> int:
        """A native tag no entry carries.  When they run out, the native tables
        are emptied (the Python dicts stay) and the kept sets numbered afresh."""
        t = self.next_tag
        if t >= native.TAG_LIMIT:
            for ctx in SU_CTX:
                self._native_clear(ctx)
            for i, entry in enumerate(self.asid_sets.values(), 1):
                entry[0] = i
            t = len(self.asid_sets) + 1
            self._apply_tag()
        self.next_tag = t + 1
        return t

    def asid(self) -> int:
        return (self.satp >> 44) & ASID_MASK

    def write_satp(self, value: int) -> None:
        """satp's new value: switch to its address space's TLB entries, keeping the
        others (a change of mode drops everything)."""
        old = self.satp
        self.satp = value
        if (old ^ value) >> 60:
            self.flush_tlb()
            return
        asid = self.asid()
        sets = self.asid_sets
        entry = sets.get(asid)
        if entry is self.cur_set:
            return
        if entry is None:
            entry = [self._new_tag(), _su_dicts(self.tlbs[3])]
            sets[asid] = entry
            while len(sets) > ASID_SETS:
                sets.popitem(last=False)
            self._su_all = None
        else:
            sets.move_to_end(asid)
        self.cur_set = entry
        self.tlbs = entry[1]
        self._apply_tag()
        self.set_priv(self.priv)

    def flush_tlb(self, all_modes: bool = False) -> None:
        """Drop every S/U mapping of every address space, global ones included
        (sfence.vma x0, x0); M-mode's too with `all_modes`.  The current dicts
        are emptied in place (the dispatcher holds the fetch dict)."""
        self.io_tlb.clear()
        cur = self.tlbs
        for ctx in SU_CTX:
            for d in cur[ctx]:
                d.clear()
            for d in self.gtlbs[ctx]:
                d.clear()
            self._native_clear(ctx)
        if all_modes:
            for d in cur[3]:
                d.clear()
            self._native_clear(3)
        self.cur_set = [1, cur]
        self.asid_sets = OrderedDict({self.asid(): self.cur_set})
        self._su_all = None
        self.next_tag = 2
        self._apply_tag()
        self.superpages.clear()
        ctypes.memset(self._sptab, 0xFF, ctypes.sizeof(self._sptab))
        self._wrev.clear()
        self._wrev_n = 0

    def flush_asid(self, asid: int) -> None:
        """Drop the non-global mappings of address space `asid` (sfence.vma x0, asid)."""
        self.io_tlb.clear()
        entry = self.asid_sets.get(asid)
        if entry is None:
            return
        for ctx in SU_CTX:
            for d in entry[1][ctx]:
                d.clear()
        entry[0] = self._new_tag()         # its native entries can no longer match
        if entry is self.cur_set:
            self._apply_tag()

    def _all_dicts(self) -> list[dict[int, int]]:
        """Every S/U TLB dict of every kept address space and the global ones."""
        out = self._su_all
        if out is None:
            seen: dict[int, dict[int, int]] = {}
            for dicts in [e[1] for e in self.asid_sets.values()] + [self.gtlbs]:
                for ctx in SU_CTX:
                    for d in dicts[ctx]:
                        seen[id(d)] = d
            out = self._su_all = list(seen.values())
        return out

    def _in_superpage(self, vpn: int) -> bool:
        sp = self.superpages
        if sp and ((vpn >> 9) in sp or (vpn >> 18) in sp or (vpn >> 27) in sp):
            return True
        t = self._sptab
        slot = native.sp_slot
        a, b, c = vpn >> 9, vpn >> 18, vpn >> 27
        return t[slot(a)] == a or t[slot(b)] == b or t[slot(c)] == c

    def flush_tlb_page(self, va: int, asid: int | None = None) -> None:
        """Drop the mappings of `va`'s page: of every address space and global ones
        (sfence.vma va, x0), or only address space `asid`'s non-global ones."""
        self.io_tlb.clear()
        vpn = (va & M64) >> 12
        if self._in_superpage(vpn):
            # Cached per 4 KiB page: which of a superpage's pages are held is not known.
            if asid is None:
                self.flush_tlb()
            else:
                self.flush_asid(asid)
            return
        slot = 2 * (vpn & (native.TLB_ENTRIES - 1))
        bases = (slot, 2 * native.TLB_ENTRIES + slot, 4 * native.TLB_ENTRIES + slot)
        if asid is None:
            for d in self._all_dicts():
                if vpn in d:
                    del d[vpn]
            for ctx in SU_CTX:
                view = self._ntlb_views[ctx]
                for at in bases:
                    if view[at] & native.VPN_MASK == vpn:
                        view[at] = M64
            return
        entry = self.asid_sets.get(asid)
        if entry is None:
            return
        for ctx in SU_CTX:
            for d in entry[1][ctx]:
                d.pop(vpn, None)
        key = vpn ^ (entry[0] << native.TAG_SHIFT)
        for ctx in SU_CTX:
            view = self._ntlb_views[ctx]
            for at in bases:
                if view[at] == key:
                    view[at] = M64

    def sfence_range(self, start: int, size: int, asid: int | None = None) -> None:
        """A remote sfence.vma from the SBI: pages [start, start + size) of every
        address space, or of `asid`'s; large or unbounded ranges flush all."""
        if (start == 0 and size == 0) or size == M64 or size > 64 << 12:
            if asid is None:
                self.flush_tlb()
            else:
                self.flush_asid(asid)
            return
        for va in range(start & ~0xFFF, start + size, 0x1000):
            self.flush_tlb_page(va, asid)

    def _note_write(self, w: dict[int, int], vpn: int, ppn: int) -> None:
        """Remember a new S/U write entry for drop_write_mapping."""
        self._wrev.setdefault(ppn, []).append((w, vpn))
        self._wrev_n += 1
        if self._wrev_n > WREV_LIMIT:
            # Rebuild from the live dicts (stale records pile up as sets are flushed).
            rev: dict[int, list[tuple[dict[int, int], int]]] = {}
            n = 0
            base = self.ram_base >> 12
            for dicts in [e[1] for e in self.asid_sets.values()] + [self.gtlbs]:
                for ctx in SU_CTX:
                    wd = dicts[ctx][1]
                    for v, o in wd.items():
                        rev.setdefault(base + ((v << 12) + o >> 12), []).append((wd, v))
                        n += 1
            self._wrev, self._wrev_n = rev, n

    def drop_write_mapping(self, ppn: int) -> None:
        """Remove write-TLB entries that map physical page `ppn` (about to be watched)."""
        target = (ppn << 12) - self.ram_base
        stale = [(w, vpn) for w, vpn in self._wrev.pop(ppn, ())
                 if (o := w.get(vpn)) is not None and (vpn << 12) + o == target]
        mw = self.tlbs[3][1]
        stale += [(mw, vpn) for vpn, o in mw.items() if (vpn << 12) + o == target]
        wbase = 2 * native.TLB_ENTRIES
        for w, vpn in stale:
            w.pop(vpn, None)            # (a page may be recorded twice)
            at = wbase + 2 * (vpn & (native.TLB_ENTRIES - 1))
            for view in self._ntlb_views.values():
                if view[at] & native.VPN_MASK == vpn:
                    view[at] = M64
        index = ppn - (self.ram_base >> 12)
        flags = self.bus.page_flags
        if 0 <= index < len(flags) - 1 and flags[index] & native.PF_NATIVE_W:
            # The native walk made write entries for it, which nothing here records:
            # drop every one of this hart's that maps the page (Engine clears the flag).
            scan = native.walker().scan
            host = self._ram_host + (ppn << 12) - self.ram_base
            for ctx in SU_CTX:
                scan(ctypes.addressof(self._ntlb[ctx]) + native.TLB_BYTES, native.TLB_ENTRIES, host)

    def drop_write_entries(self) -> None:
        """Drop every writable TLB entry, Python and native, of every address space
        and mode (a dirty-page log started or was harvested: memory.py)."""
        seen: set[int] = set()
        for dicts in [e[1] for e in self.asid_sets.values()] + [self.gtlbs, self.tlbs]:
            for ctx in (*SU_CTX, 3):
                d = dicts[ctx][1] if ctx in dicts else None
                if d is not None and id(d) not in seen:
                    seen.add(id(d))
                    d.clear()                  # in place: translated blocks hold them
        for t in self._ntlb.values():
            ctypes.memset(ctypes.addressof(t) + native.TLB_BYTES, 0xFF, native.TLB_BYTES)
        self._wrev.clear()
        self._wrev_n = 0

    def status_changed(self, old: int, new: int) -> None:
        changed = old ^ new
        if changed & MXR:
            # MXR changes what reads may do: drop every S/U read and write entry.
            for dicts in [e[1] for e in self.asid_sets.values()] + [self.gtlbs]:
                for ctx in SU_CTX:
                    for d in dicts[ctx][:2]:
                        d.clear()
            for ctx in SU_CTX:
                self._native_clear(ctx, fetch=False)
        if changed & SUM and self.priv == 1:
            self.set_priv(1)                     # the other S context
        if changed & (MPRV | MPP) or new & MPRV:
            for d in self.tlbs[3][:2]:
                d.clear()
            self._native_clear(3, fetch=False)

    # -- address translation -------------------------------------------------------
    def translate(self, va: int, access: int) -> int:
        """Physical address for `va`; fills the TLB for RAM pages."""
        priv = self.priv
        mprv = access != mmu.FETCH and priv == 3 and self.mstatus & MPRV
        if mprv:
            priv = (self.mstatus & MPP) >> MPP_SHIFT
        mode = self.satp >> 60
        level = 0
        glob = False
        if priv == 3 or mode == 0:
            pa = va
        else:
            vpn = va >> 12
            io = self.io_tlb
            if io and not mprv and access != mmu.FETCH:
                page = io.get((vpn, access, priv, self.satp, self.mstatus & (SUM | MXR)))
                if page is not None:
                    return page | (va & 0xFFF)
            g = None if mprv else self.gtlbs[self.ctx][_DICT_OF[access]].get(vpn)
            if g is not None:
                # A global mapping another address space already walked.
                glob = True
                pa = (g << 12 if access == mmu.FETCH else self.ram_base + (vpn << 12) + g) | (va & 0xFFF)
            else:
                fw = self._fetch_walk
                done = fw(self._as_parameter_, va) if fw is not None and access == mmu.FETCH else 0
                if done:
                    # The native walk (native.walk_code "fetch_c") took it; anything unusual,
                    # faults included, it declines and mmu.walk decides.
                    pa = (done & ~0xFFF) | (va & 0xFFF)
                    level = (((done >> 4) & 0xFF) - 12) // 9
                    glob = bool(done & 2)
                else:
                    st = self.mstatus
                    pa, level, glob = mmu.walk(self.bus, mode, self.satp & ((1 << 44) - 1), va, access, priv,
                                               bool(st & SUM), bool(st & MXR))
                    if not mprv and access != mmu.FETCH and not self.ram_base <= pa < self.ram_end:
                        if len(io) >= IO_TLB_LIMIT:
                            io.clear()
                        io[(vpn, access, priv, self.satp, st & (SUM | MXR))] = pa & ~0xFFF
        if not mprv and self.ram_base <= pa < self.ram_end:
            vpn = va >> 12
            ppn = pa >> 12
            page_off = (pa & ~0xFFF) - self.ram_base - (vpn << 12)
            r, w, ix = self.rtlb, self.wtlb, self.itlb
            if len(r) > TLB_LIMIT or len(w) > TLB_LIMIT or len(ix) > TLB_LIMIT:
                # Full: start this address space (or M-mode) again; globals stay.
                if self.ctx == 3:
                    for d in self.tlbs[3]:
                        d.clear()
                    self._native_clear(3)
                else:
                    self.flush_asid(self.asid())
            slot = 2 * (vpn & (native.TLB_ENTRIES - 1))
            addend = (self._ram_host + page_off) & M64
            key = vpn if glob or priv == 3 or mode == 0 else vpn ^ self.tagbits
            gd = self.gtlbs[self.ctx] if glob else None
            if gd is not None and len(gd[0]) + len(gd[1]) + len(gd[2]) > GLOBAL_LIMIT:
                self.flush_tlb()
            if level:                          # (after any flush, which forgets superpages)
                spn = vpn >> (9 * level)
                self.superpages.add(spn)
                at = native.sp_slot(spn)
                if self._sptab[at] == M64:
                    self._sptab[at] = spn
            if access == mmu.FETCH:
                ix[vpn] = ppn
                if gd is not None:
                    gd[2][vpn] = ppn
                view = self._ntlb_views[self.priv]
                view[4 * native.TLB_ENTRIES + slot] = key
                view[4 * native.TLB_ENTRIES + slot + 1] = ppn
            else:
                view = self._ntlb_views[self.ctx]
                r[vpn] = page_off
                if gd is not None:
                    gd[0][vpn] = page_off
                view[slot] = key
                view[slot + 1] = addend
                if access == mmu.STORE and ppn not in self.bus.watched:
                    log = self.bus.dirty_log
                    if log is not None:        # the only write fill: mark the page (memory.py)
                        log[(pa - self.ram_base) >> 12] = 1
                    w[vpn] = page_off
                    if self.ctx != 3:
                        self._note_write(w, vpn, ppn)
                    if gd is not None:
                        gd[1][vpn] = page_off
                        self._note_write(gd[1], vpn, ppn)
                    slot += 2 * native.TLB_ENTRIES
                    view[slot] = key
                    view[slot + 1] = addend
        return pa

    def fetch_ppn(self, va: int) -> int:
        """Physical page number of the instruction at `va` (which must be in RAM)."""
        ppn = self.itlb.get(va >> 12)
        if ppn is None:
            pa = self.translate(va, mmu.FETCH)
            if not (self.ram_base <= pa < self.ram_end):
                raise Trap(INSN_ACCESS_FAULT, va)
            ppn = pa >> 12
        return ppn

    def fetch_half(self, va: int) -> int:
        """Read 16 instruction bits at `va` through the full translation path."""
        pa = (self.fetch_ppn(va) << 12) | (va & 0xFFF)
        off = pa - self.ram_base
        return self.ram[off] | (self.ram[off + 1] << 8)

    # -- memory slow path -------------------------------------------------------------
    def mem_load(self, va: int, size: int, is_signed: bool) -> int:
        o = self.rtlb.get(va >> 12)
        if o is not None and (va & 0xFFF) + size <= 0x1000:
            v = _UNPACK[size](self.ram, va + o)[0]
            return _sext(v, size) if is_signed else v
        if (va & 0xFFF) + size > 0x1000:
            v = 0
            for i in range(size):
                v |= self.mem_load((va + i) & M64, 1, False) << (8 * i)
        else:
            pa = self.translate(va, mmu.LOAD)
            try:
                v = self.bus.read(pa, size)
            except BusError:
                raise Trap(LOAD_ACCESS_FAULT, va) from None
        return _sext(v, size) if is_signed else v

    def mem_store(self, va: int, size: int, value: int) -> None:
        o = self.wtlb.get(va >> 12)
        if o is not None and (va & 0xFFF) + size <= 0x1000:
            _PACK[size](self.ram, va + o, value & ((1 << (8 * size)) - 1))
            return
        if (va & 0xFFF) + size > 0x1000:
            # Translate every byte first so a fault leaves memory untouched.
            pas = [self.translate((va + i) & M64, mmu.STORE) for i in range(size)]
            for i, pa in enumerate(pas):
                self._store_pa(pa, 1, (value >> (8 * i)) & 0xFF, va)
            return
        self._store_pa(self.translate(va, mmu.STORE), size, value, va)

    def _store_pa(self, pa: int, size: int, value: int, va: int) -> None:
        try:
            self.bus.write(pa, size, value)
        except BusError:
            raise Trap(STORE_ACCESS_FAULT, va) from None

    # -- A extension -------------------------------------------------------------------
    def lr(self, va: int, size: int) -> int:
        if va & (size - 1):
            raise Trap(LOAD_MISALIGNED, va)
        pa = self.translate(va, mmu.LOAD)
        try:
            v = self.bus.read(pa, size)
        except BusError:
            raise Trap(LOAD_ACCESS_FAULT, va) from None
        self.resv = pa - self.ram_base
        return _sext(v, size)

    def sc(self, va: int, value: int, size: int) -> int:
        if va & (size - 1):
            raise Trap(STORE_MISALIGNED, va)
        pa = self.translate(va, mmu.STORE)
        ok = self.resv == pa - self.ram_base
        self.resv = -1
        if not ok:
            return 1
        self._store_pa(pa, size, value & _AMO_MASK[size], va)
        return 0

    def amo(self, op: str, va: int, src: int, size: int) -> int:
        if va & (size - 1):
            raise Trap(STORE_MISALIGNED, va)
        pa = self.translate(va, mmu.STORE)
        try:
            old = self.bus.read(pa, size)
        except BusError:
            raise Trap(STORE_ACCESS_FAULT, va) from None
        mask = _AMO_MASK[size]
        b = src & mask
        if op == "amoswap":
            new = b
        elif op == "amoadd":
            new = (old + b) & mask
        elif op == "amoxor":
            new = old ^ b
        elif op == "amoand":
            new = old & b
        elif op == "amoor":
            new = old | b
        elif op in ("amominu", "amomaxu"):
            new = min(old, b) if op == "amominu" else max(old, b)
        else:
            so, sb = _sext(old, size), _sext(b, size)
            so = so - (1 << 64) if so >> 63 else so
            sb = sb - (1 << 64) if sb >> 63 else sb
            pick = min(so, sb) if op == "amomin" else max(so, sb)
            new = pick & mask
        self._store_pa(pa, size, new, va)
        return _sext(old, size)

    # -- floating-point rounding mode ----------------------------------------------------
    def dyn_rm(self) -> int:
        if self.frm > 4:
            raise Trap(ILLEGAL_INSN, 0)
        return self.frm

    def check_rm(self, rm: int) -> int:
        if rm == 7:
            return self.dyn_rm()
        if rm > 4:
            raise Trap(ILLEGAL_INSN, 0)
        return rm

    # -- interrupts and traps ----------------------------------------------------------------
    def set_irq(self, bit: int, level: bool) -> None:
        """An interrupt line into mip (from the CLINT, PLIC or the SBI timer)."""
        if level:
            self.mip |= bit
        else:
            self.mip &= ~bit

    def timer_compare(self) -> None:
        """Sstc: mip.STIP follows time >= stimecmp."""
        self.set_irq(STIP, self.clock.ticks() >= self.stimecmp)

    def pending_interrupt(self) -> int:
        """The interrupt to take now (cause code), or -1."""
        pend = self.mip & self.mie
        if not pend:
            return -1
        m = pend & ~self.mideleg
        if m and (self.priv < 3 or self.mstatus & MIE):
            pend = m
        else:
            pend &= self.mideleg
            if not pend or self.priv > 1 or (self.priv == 1 and not self.mstatus & SIE):
                return -1
        for code in _PRIORITY:
            if pend >> code & 1:
                return code
        return -1

    def interrupt_now(self) -> None:
        """After a CSR write: take a newly enabled interrupt before the next instruction."""
        code = self.pending_interrupt()
        if code >= 0:
            raise Trap(INTERRUPT_BIT | code, 0)

    def take_trap(self, cause: int, tval: int) -> None:
        """Enter the trap handler (privileged spec 3.1.6.1, 3.3.1); xepc = self.pc."""
        interrupt = cause >> 63
        code = cause & 0x7FFF_FFFF_FFFF_FFFF
        deleg = self.mideleg if interrupt else self.medeleg
        st = self.mstatus
        self.idle = False
        if self.priv <= 1 and (deleg >> code) & 1:
            self.scause, self.sepc, self.stval = cause, self.pc, tval & M64
            st &= ~(SPIE | SPP)
            if st & SIE:
                st |= SPIE
            st = (st & ~SIE) | (self.priv << 8)
            vec = self.stvec
            self.mstatus = st
            self.set_priv(1)
        else:
            self.mcause, self.mepc, self.mtval = cause, self.pc, tval & M64
            st &= ~(MPIE | MPP)
            if st & MIE:
                st |= MPIE
            st = (st & ~MIE) | (self.priv << MPP_SHIFT)
            vec = self.mtvec
            self.mstatus = st
            self.set_priv(3)
        base = vec & ~3
        self.pc = base + 4 * code if (vec & 1 and interrupt) else base

    def take_pending_interrupt(self) -> bool:
        code = self.pending_interrupt()
        if code < 0:
            return False
        self.take_trap(INTERRUPT_BIT | code, 0)
        return True

    # -- system instructions ---------------------------------------------------------------
    def ecall(self) -> int:
        hook = self.ecall_hook
        if hook is not None and hook(self):
            return (self.pc + 4) & M64
        raise Trap(ECALL_FROM_U + self.priv, 0)

    def _after_xret(self, old_priv: int) -> int:
        code = self.pending_interrupt()
        if code >= 0:
            raise Trap(INTERRUPT_BIT | code, 0)
        if self.priv != old_priv:
            raise ContextChange()
        return self.pc

    def mret(self) -> int:
        if self.priv != 3:
            raise Trap(ILLEGAL_INSN, 0)
        st = self.mstatus
        mpp = (st & MPP) >> MPP_SHIFT
        st = (st & ~MIE) | (MIE if st & MPIE else 0)
        st = (st | MPIE) & ~MPP
        if mpp != 3:
            st &= ~MPRV
        old = self.mstatus
        self.mstatus = st
        self.status_changed(old, st)
        self.pc = self.mepc
        self.set_priv(mpp)
        return self._after_xret(3)

    def sret(self) -> int:
        if self.priv == 0 or (self.priv == 1 and self.mstatus & TSR):
            raise Trap(ILLEGAL_INSN, 0)
        old_priv = self.priv
        st = self.mstatus
        spp = (st >> 8) & 1
        st = (st & ~SIE) | (SIE if st & SPIE else 0)
        st = (st | SPIE) & ~SPP
        st &= ~MPRV
        old = self.mstatus
        self.mstatus = st
        self.status_changed(old, st)
        self.pc = self.sepc
        self.set_priv(spp)
        return self._after_xret(old_priv)

    def wfi(self, npc: int) -> int:
        if self.priv == 0 or (self.priv == 1 and self.mstatus & TW):
            raise Trap(ILLEGAL_INSN, 0)
        self.pc = npc
        if not (self.mip & self.mie):
            self.idle = True
        raise StopSlice()

    def pause(self, npc: int) -> int:
        if self.yield_on_pause:
            self.pc = npc
            raise StopSlice()
        return npc

    def native_refill(self, va: int) -> None:
        """Copy the Python TLB's mappings of `va`'s page into the native tables."""
        vpn = va >> 12
        ctx = self.ctx
        view = self._ntlb_views[ctx]
        slot = 2 * (vpn & (native.TLB_ENTRIES - 1))
        key = vpn
        if ctx != 3 and self.satp >> 60 and vpn not in self.gtlbs[ctx][0]:
            key ^= self.tagbits
        o = self.rtlb.get(vpn)
        if o is not None:
            view[slot] = key
            view[slot + 1] = (self._ram_host + o) & M64
        o = self.wtlb.get(vpn)
        if o is not None:
            slot += 2 * native.TLB_ENTRIES
            view[slot] = key
            view[slot + 1] = (self._ram_host + o) & M64

    def native_fetch_refill(self, pc: int) -> None:
        """Copy the fetch TLB's mapping of `pc`'s page into the native fetch table, as
        `translate` fills it.  The dict outlives the direct-mapped table's entry (another
        page, or another address space after a context switch, takes its slot), and the
        dispatcher, finding the page in the dict, never walks it again."""
        vpn = pc >> 12
        ppn = self.itlb.get(vpn)
        if ppn is None:
            return
        key = vpn
        if self.priv != 3 and self.satp >> 60 and self.gtlbs[self.ctx][2].get(vpn) != ppn:
            key ^= self.tagbits
        slot = 4 * native.TLB_ENTRIES + 2 * (vpn & (native.TLB_ENTRIES - 1))
        view = self._ntlb_views[self.priv]
        view[slot] = key
        view[slot + 1] = ppn

    def native_exit(self, pc: int) -> int:
        """A native block stopped before the instruction at `pc`: run it here."""
        assert self.native_exit_hook is not None
        return self.native_exit_hook(self, pc)

    def stop_at(self, pc: int) -> int:
        """End this hart's slice; it resumes at `pc` (the block's count is settled)."""
        self.pc = pc
        raise StopSlice()

    def sfence_vma(self, rs1: int, vaddr: int, npc: int, rs2: int = 0, asid: int = 0) -> int:
        """sfence.vma (4.2.1): rs1 = x0 all pages, else vaddr's; rs2 = x0 every address
        space and global mappings, else only address space `asid`'s non-global ones."""
        if self.priv == 0 or (self.priv == 1 and self.mstatus & TVM):
            raise Trap(ILLEGAL_INSN, 0)
        which = None if rs2 == 0 else asid & ASID_MASK
        if rs1 == 0:
            if which is None:
                self.flush_tlb()
            else:
                self.flush_asid(which)
        else:
            self.flush_tlb_page(vaddr, which)
        return npc

    def fs_enabled(self) -> bool:
        return bool(self.mstatus & FS)
