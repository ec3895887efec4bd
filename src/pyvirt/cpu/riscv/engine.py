"""The execution engine: block cache, interpreter tier, translated tier, dispatcher.

Guest code runs in *blocks*: straight-line runs of instructions inside one
4 KiB page that end at a control transfer or a system instruction.  A block
is keyed by (privilege, virtual pc, physical page) and cached per privilege
by virtual pc; each dispatch checks that the fetch TLB still maps the pc's
page to the block's physical page.

Tiers behind one interface (a block entry is `(fn, length, ppn)` where
`fn(hart)` runs the block and returns the next pc):

* `interp`: every block runs its instructions one by one through generic
  handlers (emit.GenericEmitter), using the hart's checked memory slow path.
  This is the reference.
* `jit`: a block executed `hot` times is translated to a Python function
  (emit.BlockEmitter) with registers in locals and TLB-based RAM access.

Stores into a page holding translated code (by the CPU or by device DMA)
invalidate that page's blocks: the bus watches those pages, and the harts'
write TLBs never map them.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from pyvirt.cpu.riscv import isa, native
from pyvirt.cpu.riscv.codecache import CodeCache, footprint
from pyvirt.cpu.riscv.decode import ILLEGAL, Insn, decode
from pyvirt.cpu.riscv.emit import BlockEmitter, GenericEmitter
from pyvirt.cpu.riscv.hart import Hart
from pyvirt.cpu.riscv.traps import ILLEGAL_INSN, ContextChange, StopSlice, Trap
from pyvirt.engines import ENGINES, default_engine  # noqa: F401 - re-exported
from pyvirt.memory import Bus

log = logging.getLogger(__name__)

MAX_BLOCK = 64
# Bounds on the translation cache (see Engine._build): reaching MAX_BLOCKS forgets every
# block's address (the native code stays, found again through Engine.shared); reaching
# MAX_NATIVE_CODE empties it all.
MAX_BLOCKS = 250_000
MAX_NATIVE_CODE = 192 << 20
MAX_CROSSING = 4096         # page-crossing instructions remembered (see Engine.lookup)

Entry = tuple[Callable[[Hart], int], int, int]

# Instructions that end a block.  csrr (csrrs/csrrc reading with rs1 = x0)
# is a pure read and does not.
_ENDS = {"jal", "jalr", "ecall", "ebreak", "pause",
         "mret", "sret", "wfi", "sfence_vma", "fence_i", "illegal",
         "csrrw", "csrrwi", "csrrs", "csrrc", "csrrsi", "csrrci"}


_DIRECT = {"jal", "beq", "bne", "blt", "bge", "bltu", "bgeu"}


def ends_block(ins: Insn) -> bool:
    if ins.name in _ENDS:
        return not (ins.name in ("csrrs", "csrrc", "csrrsi", "csrrci") and ins.rs1 == 0)
    return False


def _struct_helpers() -> dict[str, Any]:
    fmts = {"LBU": "<B", "LB": "<b", "LHU": "<H", "LH": "<h", "LWU": "<I", "LW": "<i", "LD": "<Q"}
    out: dict[str, Any] = {k: struct.Struct(f).unpack_from for k, f in fmts.items()}
    for k, f in {"SB": "<B", "SH": "<H", "SW": "<I", "SD": "<Q"}.items():
        out[k] = struct.Struct(f).pack_into
    return out


_BASE_GLOBALS: dict[str, Any] = {"Trap": Trap, **isa.HELPERS, **_struct_helpers()}


def _build_handlers() -> dict[str, Callable[[Hart, tuple[Any, ...]], int | None]]:
    handlers = {}
    ns: dict[str, Any] = dict(_BASE_GLOBALS)
    for name, tmpl in isa.TEMPLATES.items():
        e = GenericEmitter()
        tmpl(e)
        src = e.function(f"op_{name}")
        exec(compile(src, f"<handler {name}>", "exec"), ns)
        handlers[name] = ns[f"op_{name}"]
    return handlers


HANDLERS = _build_handlers()


class Engine:
    """Runs harts of one machine; owns the translated-code caches."""

    def __init__(self, bus: Bus, mode: str = "jit", hot: int = 16,
                 code_cache: CodeCache | None = None) -> None:
        """`code_cache`: translations kept across runs (native engine only; see codecache.py)."""
        if mode not in ENGINES:
            raise ValueError(f"unknown engine {mode!r}")
        self.bus = bus
        self.mode = mode
        self.hot = hot
        self.harts: list[Hart] = []
        self.caches: dict[int, dict[int, Entry]] = {0: {}, 1: {}, 3: {}}
        self.blocks: dict[tuple[int, int, int], Entry] = {}
        self.page_keys: dict[int, list[tuple[int, int, int]]] = {}
        self.crossing: dict[tuple[int, int, int], Entry] = {}   # see lookup()
        self.native_code: dict[Callable[[Hart], int], int] = {}  # native entry -> code address
        # (privilege, physical page, page offset) -> (code address, instructions covered) of
        # the native blocks in the code buffer: the same code serves that page at any virtual
        # address (native._BlockGen._mov_pc), e.g. a library in every process that maps it
        self.shared: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.shared_pages: dict[int, list[tuple[int, int]]] = {}   # ppn -> its (privilege, offset)s
        # ppn -> (privilege, page offset) -> host addresses of the exit jumps (rel32s) of that
        # page's blocks that go to that offset once a native block is there (see _link)
        self.links: dict[int, dict[tuple[int, int], list[int]]] = {}
        self.globals: dict[str, Any] = dict(_BASE_GLOBALS, ram=bus.ram)
        self.stats = {"translated": 0, "interp_blocks": 0, "invalidated": 0, "flushes": 0, "forgets": 0, "links": 0}
        if mode == "native" and not native.available():
            raise ValueError("the native engine needs an x86-64 Linux host")
        self.native = native.Translator() if mode == "native" else None
        self.jumps = native.JumpTables() if mode == "native" else None
        self.walk = native.walk_setting() if mode == "native" else (False, None)
        self.fetch_walk = native.fetch_walk_setting() if mode == "native" else False
        self.code_cache = code_cache if self.native is not None else None
        self._stop_half: int | None = None     # see _decode_block
        # PYVIRT_PERF_MAP=1: name each native block in /tmp/perf-PID.map, as QEMU's -perfmap,
        # so `perf report` on the VM's process shows guest pcs ("g_<priv>_<pc>")
        self.perf_map: TextIO | None = None
        if self.native is not None and os.environ.get("PYVIRT_PERF_MAP"):
            try:
                self.perf_map = open(f"/tmp/perf-{os.getpid()}.map", "a", buffering=1)   # noqa: SIM115
            except OSError as e:                      # (a jailed runner cannot write there)
                log.warning("PYVIRT_PERF_MAP: cannot write the perf map: %s", e.strerror)
        bus.add_log_hook(self.drop_write_entries)

    def drop_write_entries(self) -> None:
        """The bus's dirty-log hook: no hart keeps a writable TLB entry (memory.py)."""
        for h in self.harts:
            h.drop_write_entries()

    def add_hart(self, hart: Hart) -> None:
        if self.native is not None and isinstance(hart.x, list):
            raise ValueError("the native engine needs harts made with native_regs=True")
        self.harts.append(hart)
        hart.native_exit_hook = self._native_exit
        hart.rechain_hook = self._rechain
        if self.jumps is not None:
            hart.jump_tables = self.jumps
            hart.set_priv(hart.priv)
            hart.set_walker(*self.walk, fetch=self.fetch_walk)

    # -- dispatch ---------------------------------------------------------------
    def run(self, h: Hart, budget: int) -> int:
        """Run hart `h` for about `budget` instructions; returns how many ran."""
        caches = self.caches
        lookup = self.lookup
        start = budget
        pc = h.pc
        if self.native is not None:
            h.set_clock_words(*h.clock.native_params())
        while True:
            cache = caches[h.priv]
            itlb = h.itlb
            try:
                while budget > 0:
                    ent = cache.get(pc)
                    if ent is None or itlb.get(pc >> 12) != ent[2]:
                        h.pc = pc
                        ent = lookup(h, pc)
                    pc = ent[0](h)
                    budget -= ent[1]
                h.pc = pc
                break
            except Trap as t:
                budget -= 1
                tval = t.tval
                if t.cause == ILLEGAL_INSN and tval == 0:
                    tval = self._insn_bits(h)   # helpers find the fault; tval is the instruction
                h.take_trap(t.cause, tval)
                pc = h.pc
            except ContextChange:
                # Raised by a block's last instruction (mret, sret), after it
                # accounted for itself against the block's full charge.
                budget -= ent[1]
                pc = h.pc
            except StopSlice:
                budget -= ent[1]                  # likewise (wfi, pause, ecall, loop stops)
                break
        ran = start - budget + h.adj
        h.adj = 0
        h.instret += ran
        return ran

    def lookup(self, h: Hart, pc: int) -> Entry:
        ppn = h.fetch_ppn(pc)
        key = (h.priv, pc, ppn)
        ent = self.blocks.get(key)
        if ent is None:
            ent = self.crossing.get(key)
            if ent is not None:
                return ent
            ent = self._build(key)
            if ent[0] is self._crossing_insn:
                fast = self._crossing_block(h, key)
                if fast is not None:
                    ent = fast
                else:
                    # It reads h.pc, so it must go through lookup every time; kept apart so
                    # that it is not decoded again each time.  It fetches both halves
                    # itself, so a store to either page cannot make it stale.
                    if len(self.crossing) < MAX_CROSSING:
                        self.crossing[key] = ent
                    return ent
        self.caches[h.priv][pc] = ent
        return ent

    def _crossing_block(self, h: Hart, key: tuple[int, int, int]) -> Entry | None:
        """A 32-bit instruction straddling two pages, decoded once: a block of its own (the
        Debian kernel's network receive path runs such instructions about 10 k times a
        second, each an exit from native code into the generic path below).

        Both pages are watched, so a store to either drops it, as for any block; its
        first page is checked as any block's is (Engine.run), the second by the fetch
        TLB at each run: another address space may map another page after the first,
        and then the generic path fetches both halves.  None where that path must run
        (the first half now a 16-bit instruction, an illegal one: its tval is the
        instruction, read from h.pc)."""
        priv, pc, ppn = key
        lo = h.fetch_half(pc)
        if lo & 3 != 3:
            return None
        pc2 = (pc + 2) & isa.M
        ppn2 = h.fetch_ppn(pc2)
        ins = decode(lo | h.fetch_half(pc2) << 16)
        if ins.name == ILLEGAL:
            return None
        d = (HANDLERS[ins.name], ins.rd, ins.rs1, ins.rs2, ins.rs3, ins.imm, ins.rm, ins.length,
             ins.raw, pc)
        handler = d[0]
        after = (pc + 4) & isa.M
        vpn2 = pc2 >> 12
        generic = self._crossing_insn

        def run(h: Hart) -> int:
            if h.itlb.get(vpn2) != ppn2:
                h.pc = pc
                return generic(h)
            nxt = handler(h, d)
            return after if nxt is None else nxt
        ent = (run, 1, ppn)
        self._register(key, ent)
        self._watch(ppn2).append(key)
        return ent

    def block_keys(self) -> list[tuple[int, int, int]]:
        """(privilege, pc, physical page) of every block translated now, the newest last: what
        a migration's destination translates ahead (`warm`)."""
        return list(self.blocks)

    def warm(self, keys: Iterable[tuple[int, int, int]]) -> int:
        """Translate the blocks `keys` name ((privilege, pc, physical page), as `block_keys`
        gives them; untrusted: anything not a RAM page or a privilege is skipped) before they
        run, from the code cache where it has them: a migrated guest's first slices then
        run at full speed instead of translating its whole working set.  A block stays
        correct as any other: a later write to its page drops it.  Returns how many were made."""
        bus = self.bus
        first, last = bus.ram_base >> 12, (bus.ram_end >> 12) - 1
        made = 0
        for key in keys:
            priv, pc, ppn = key
            if priv not in self.caches or not first <= ppn <= last or key in self.blocks or key in self.crossing:
                continue
            ent = self._build(key)
            if ent[0] is not self._crossing_insn:
                made += 1
        return made

    # -- building blocks -------------------------------------------------------------
    def _decode_block(self, pc: int, ppn: int) -> list[tuple[Insn, int]]:
        """Decode the block entered at `pc`: it runs on past conditional branches
        (side exits) and follows direct jumps that stay in the page."""
        ram = self.bus.ram
        base = (ppn << 12) - self.bus.ram_base
        page = pc & ~0xFFF
        out: list[tuple[Insn, int]] = []
        seen: set[int] = set()
        a = pc
        self._stop_half = None
        while len(out) < MAX_BLOCK and a not in seen:
            po = a & 0xFFF
            lo = ram[base + po] | (ram[base + po + 1] << 8) if po <= 0xFFE else 0
            if lo & 3 == 3:
                if po > 0xFFC:
                    self._stop_half = po       # (the code cache's footprint includes it)
                    break                      # crosses into the next page
                word = lo | ((ram[base + po + 2] | (ram[base + po + 3] << 8)) << 16)
            else:
                word = lo
            ins = decode(word)
            out.append((ins, a))
            seen.add(a)
            if ins.name == "jal":
                target = (a + ins.imm) & isa.M
                if target & ~0xFFF != page or target in seen:
                    break
                a = target
                continue
            a = (a + ins.length) & isa.M
            if ends_block(ins) or a & ~0xFFF != page:
                break
        return out

    def _build(self, key: tuple[int, int, int]) -> Entry:
        if self.native is not None and self.native.used >= MAX_NATIVE_CODE:
            # The code buffer is full (a long-lived guest runs ever new code).  Start
            # again from empty, as QEMU's tb_flush does.
            self.flush()
            self.stats["flushes"] += 1
        elif len(self.blocks) >= MAX_BLOCKS:
            # Too many addresses (every process maps its libraries at new addresses, and
            # the blocks of processes long gone stay): forget them all; native code stays
            # and is found again by its physical page.
            self._forget_addresses()
            self.stats["forgets"] += 1
        priv, pc, ppn = key
        if self.native is not None:
            shared = self.shared.get((priv, ppn, pc & 0xFFF))
            if shared is not None:
                ent = self._native_at(key, *shared)
                self._register(key, ent)
                return ent
        if self.code_cache is not None:
            ent = self._cached_native(key)
            if ent is not None:
                self._register(key, ent)
                return ent
        insns = self._decode_block(pc, ppn)
        if not insns:
            return (self._crossing_insn, 1, ppn)   # never cached: see lookup()
        last, last_pc = insns[-1]
        end_pc = (last_pc + last.length) & isa.M
        n = len(insns)
        ent = None
        if self.native is not None:
            # Machine code at once: translating costs about as much as interpreting
            # a block a few times, and most kernel blocks run more often than that.
            ent = self._native(insns, key)
        if ent is None:
            if self.mode != "interp" and self.hot <= 1:
                ent = self._translated(insns, end_pc, key)
            else:
                ops = tuple((HANDLERS[ins.name], ins.rd, ins.rs1, ins.rs2, ins.rs3, ins.imm, ins.rm,
                             ins.length, ins.raw, a) for ins, a in insns)
                ent = (self._interp_block(key, insns, ops, end_pc), n, ppn)
        self._register(key, ent)
        return ent

    def _register(self, key: tuple[int, int, int], ent: Entry) -> None:
        self._watch(key[2]).append(key)
        self.blocks[key] = ent

    def _watch(self, ppn: int) -> list[tuple[int, int, int]]:
        """The keys of the blocks made from page `ppn`; watched from the first on."""
        keys = self.page_keys.get(ppn)
        if keys is None:
            keys = self.page_keys[ppn] = []
            self.bus.watch(ppn, self._code_written)
            for h in self.harts:
                h.drop_write_mapping(ppn)
            self.bus.clear_native_write(ppn)
        return keys

    def _interp_block(self, key: tuple[int, int, int], insns: list[tuple[Insn, int]],
                      ops: tuple[tuple[Any, ...], ...], end_pc: int) -> Callable[[Hart], int]:
        self.stats["interp_blocks"] += 1
        promote = self.mode != "interp"
        remaining = self.hot - 1

        def run(h: Hart) -> int:
            nonlocal remaining
            if promote:
                remaining -= 1
                if remaining <= 0:
                    self._promote(key, insns, end_pc)
            i = 0
            for d in ops:
                i += 1
                nxt = d[0](h, d)
                if nxt is not None:
                    if i != n:
                        h.adj += i - n
                    return nxt
            return end_pc
        n = len(ops)
        return run

    def _promote(self, key: tuple[int, int, int], insns: list[tuple[Insn, int]], end_pc: int) -> None:
        old = self.blocks.get(key)
        if old is None:
            return                              # invalidated meanwhile
        ent = self._translated(insns, end_pc, key)
        self.blocks[key] = ent
        cache = self.caches[key[0]]
        if cache.get(key[1]) is old:
            cache[key[1]] = ent

    def _native(self, insns: list[tuple[Insn, int]], key: tuple[int, int, int]) -> Entry | None:
        """A native translation of the block's first instructions, or None."""
        priv, pc, ppn = key
        if self.native is None or self.jumps is None:
            return None
        done = self.native.translate(insns, priv)
        if done is None:
            return None
        code, cut = done
        if self.code_cache is not None:
            self.code_cache.store(priv, pc, footprint(insns, self._stop_half), self._page(ppn),
                                  *self.native.last, cut)
        self._share(key, code, cut, *self.native.last)
        return self._native_at(key, code, cut)

    def _share(self, key: tuple[int, int, int], code: int, cut: int, made: bytes, far: list[int]) -> None:
        """Native code `made` (its far jumps at `far`) was placed for key's page and offset,
        entered at `code`."""
        priv, pc, ppn = key
        off = pc & 0xFFF
        if self.perf_map is not None:
            self.perf_map.write(f"{code - native.LINKED_ENTRY:x} {len(made):x} g_{priv}_{pc:x}\n")
        self.shared[(priv, ppn, off)] = (code, cut)
        self.shared_pages.setdefault(ppn, []).append((priv, off))
        assert self.jumps is not None
        self.jumps.insert(priv, ppn << 12 | off, code)
        self._link(priv, ppn, off, code, native.direct_exits(made, far))

    def _link(self, priv: int, ppn: int, off: int, code: int, exits: list[tuple[int, int]]) -> None:
        """Jumps between the native blocks of one page, made direct (no chain stub, no
        jump-table lookup): the new block's exits to a pc in its own page go straight to
        the block there if it exists, else wait for it (`links`); and the exits waiting
        for this block go to it now.  Every address of the page runs the same code, and
        a write to the page drops all of its blocks together, so a direct jump never
        outlives its target."""
        waiting = self.links.setdefault(ppn, {})
        base = code - native.LINKED_ENTRY
        for at, k in exits:
            target = off + k
            if not 0 <= target < 4096:
                continue                              # (another page: the chain stub's)
            there = self.shared.get((priv, ppn, target))
            if there is None:
                waiting.setdefault((priv, target), []).append(base + at)
            elif native.link(base + at, there[0]):
                self.stats["links"] += 1
        for site in waiting.pop((priv, off), ()):
            if native.link(site, code):
                self.stats["links"] += 1

    def _native_at(self, key: tuple[int, int, int], code: int, cut: int) -> Entry:
        """The entry for native code at `code` run at key's pc."""
        priv, pc, ppn = key
        run = native.native_entry(code, cut, pc)
        self.native_code[run] = code
        return (run, cut, ppn)

    def _page(self, ppn: int) -> memoryview:
        base = (ppn << 12) - self.bus.ram_base
        return memoryview(self.bus.ram)[base:base + 4096]

    def _cached_native(self, key: tuple[int, int, int]) -> Entry | None:
        """The block's translation from an earlier run, if its guest bytes are the same."""
        priv, pc, ppn = key
        assert self.code_cache is not None and self.native is not None and self.jumps is not None
        base = (ppn << 12) - self.bus.ram_base
        if not 0 <= base <= len(self.bus.ram) - 4096:
            return None
        hit = self.code_cache.lookup(priv, pc, self._page(ppn))
        if hit is None:
            return None
        code, far, cut = hit
        addr = self.native.place(code, far)
        self._share(key, addr, cut, code, far)
        return self._native_at(key, addr, cut)

    def _rechain(self, h: Hart, pc: int) -> None:
        """Native code failed to chain to `pc`: if its page has native code there, put
        back what the chaining stub looks at — the jump-table entry of that physical
        address (another block whose address hashes to the same set takes it) and the
        page's native fetch-table entry (another page or another address space takes
        that slot, and nothing refilled it while the itlb dict held the page)."""
        ppn = h.itlb.get(pc >> 12)
        if ppn is None or self.jumps is None:
            return
        shared = self.shared.get((h.priv, ppn, pc & 0xFFF))
        if shared is not None:
            self.jumps.insert(h.priv, ppn << 12 | (pc & 0xFFF), shared[0])
            h.native_fetch_refill(pc)

    def close(self) -> None:
        """The VM is done with the engine: keep this run's translations for the next one."""
        if self.code_cache is not None:
            self.code_cache.save()

    def _translated(self, insns: list[tuple[Insn, int]], end_pc: int, key: tuple[int, int, int]) -> Entry:
        """The best translation of a block: native if it can start natively, else Python."""
        ent = self._native(insns, key)
        if ent is not None:
            return ent
        return (self._compile(insns, end_pc), len(insns), key[2])

    @staticmethod
    def _insn_bits(h: Hart) -> int:
        """The instruction at h.pc, for an illegal-instruction tval (0 if it can't be fetched)."""
        try:
            lo = h.fetch_half(h.pc)
            if lo & 3 != 3:
                return lo
            return lo | (h.fetch_half((h.pc + 2) & isa.M) << 16)
        except Trap:
            return 0

    def _native_exit(self, h: Hart, pc: int) -> int:
        """Run the one instruction a native block could not, through the interpreter."""
        h.pc = pc
        ppn = h.fetch_ppn(pc)
        off = (ppn << 12) - self.bus.ram_base + (pc & 0xFFF)
        ram = self.bus.ram
        word = ram[off] | (ram[off + 1] << 8)
        if word & 3 == 3:
            word |= (ram[off + 2] | (ram[off + 3] << 8)) << 16
        ins = decode(word)
        va = (h.x[ins.rs1] + ins.imm) & isa.M
        d = (HANDLERS[ins.name], ins.rd, ins.rs1, ins.rs2, ins.rs3, ins.imm, ins.rm, ins.length, ins.raw, pc)
        nxt = d[0](h, d)
        h.adj += 1
        if ins.name in native.MEMORY_OPS:
            # The Python TLB may have had the page all along (the native table is
            # direct-mapped and smaller): copy it over so the next access stays native.
            h.native_refill(va)
        return (pc + ins.length) & isa.M if nxt is None else nxt

    @staticmethod
    def _emit(insns: list[tuple[Insn, int]], end_pc: int) -> str:
        entry = insns[0][1]
        loop = any(ins.name in _DIRECT and (a + ins.imm) & isa.M == entry for ins, a in insns)
        total = len(insns)

        def emit(e: BlockEmitter) -> BlockEmitter:
            for i, (ins, a) in enumerate(insns):
                e.begin(ins, a, i, insns[i + 1][1] if i + 1 < total else None)
                isa.TEMPLATES[ins.name](e)
                if e.ended:
                    break
            return e

        e = emit(BlockEmitter(entry, total, loop))
        return e.function(f"b_{entry:x}", end_pc)

    def _compile(self, insns: list[tuple[Insn, int]], end_pc: int) -> Callable[[Hart], int]:
        src = self._emit(insns, end_pc)
        name = f"b_{insns[0][1]:x}"
        ns: dict[str, Any] = {}
        exec(compile(src, f"<block {insns[0][1]:#x}>", "exec"), self.globals, ns)
        self.stats["translated"] += 1
        fn: Callable[[Hart], int] = ns[name]
        return fn

    def block_source(self, pc: int, ppn: int) -> str:
        """The Python source the translator makes for the block at pc (for debugging)."""
        insns = self._decode_block(pc, ppn)
        last, last_pc = insns[-1]
        return self._emit(insns, (last_pc + last.length) & isa.M)

    @staticmethod
    def _crossing_insn(h: Hart) -> int:
        """A 32-bit instruction straddling two pages: fetch both halves every time.  (If
        the first half now holds a 16-bit instruction, only that: the entry is kept in
        Engine.crossing while the code may change.)"""
        pc = h.pc
        lo = h.fetch_half(pc)
        if lo & 3 == 3:
            lo |= h.fetch_half((pc + 2) & isa.M) << 16
        ins = decode(lo)
        d = (HANDLERS[ins.name], ins.rd, ins.rs1, ins.rs2, ins.rs3, ins.imm, ins.rm,
             ins.length, ins.raw, pc)
        nxt = d[0](h, d)
        return (pc + ins.length) & isa.M if nxt is None else nxt

    # -- invalidation ---------------------------------------------------------------------
    def _code_written(self, addr: int, length: int) -> None:
        for ppn in range(addr >> 12, ((addr + length - 1) >> 12) + 1):
            keys = self.page_keys.pop(ppn, None)
            if keys is None:
                continue
            self.bus.unwatch(ppn, self._code_written)
            self.links.pop(ppn, None)
            for priv, off in self.shared_pages.pop(ppn, ()):
                self.shared.pop((priv, ppn, off), None)
                if self.jumps is not None:
                    self.jumps.remove(priv, ppn << 12 | off)
            for key in keys:
                ent = self.blocks.pop(key, None)
                if ent is not None:
                    self.native_code.pop(ent[0], None)
                cache = self.caches[key[0]]
                if ent is not None and cache.get(key[1]) is ent:
                    del cache[key[1]]
                self.stats["invalidated"] += 1

    def _forget_addresses(self) -> None:
        """Drop every block's entry by address; keep the native code, which `_build` finds
        again in `shared`, and keep watching its pages (their key lists start empty)."""
        self.blocks.clear()
        self.crossing.clear()
        self.native_code.clear()
        for c in self.caches.values():
            c.clear()
        for keys in self.page_keys.values():
            keys.clear()

    def flush(self) -> None:
        """Drop every translation (e.g. after loading a snapshot into RAM)."""
        self._forget_addresses()
        for ppn in list(self.page_keys):
            self.bus.unwatch(ppn, self._code_written)
        self.page_keys.clear()
        self.shared.clear()
        self.shared_pages.clear()
        self.links.clear()
        if self.jumps is not None:
            self.jumps.clear()              # (the jump table holds the physical addresses' code)
        if self.native is not None:
            self.native.reset()
