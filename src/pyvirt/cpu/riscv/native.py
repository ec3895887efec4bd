"""The native tier: hot blocks translated to x86-64 machine code.

A native block is called through ctypes with the hart's state buffer: the 32
integer registers, then bookkeeping words, then pointers to the current
privilege's native TLB tables.  It runs the block's instructions directly on
that buffer and returns the next pc.  Anything it cannot do natively — a TLB
miss, MMIO, a page crossing, an instruction it does not implement — it hands
back: it returns the pc of that instruction with bit 0 set, and the hart
executes that one instruction in the interpreter (`Hart.native_exit`) — a TLB
miss first calls the native page walk, which fills the entry for ordinary RAM
pages and declines the rest.  So
every exit makes progress and faults are raised by the Python slow path, with
the registers already in memory: state is always precise.

Native TLB: per privilege context, TLB_ENTRIES direct-mapped entries for
reads and as many for writes, each (tagged virtual page number, addend) with
host address = va + addend; an access hits on the bare vpn (a global entry)
or on vpn ^ [W_TAG] (the current address space's).  The hart fills them
when it fills its Python TLB dicts, and native code fills them on a miss with
the native page walk (walk_code), which the dicts do not see; neither fills a
write entry for a page holding translated code.  The dispatcher's fetch misses
go through Hart.translate, which tries the same walk (its fetch entry) before
mmu.walk.

Only on x86-64 hosts (Linux, System V ABI); elsewhere the Python tiers run.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from pyvirt.cpu.riscv.csr import FS, MXR, SD, SIE, SPIE, SPP, SSTATUS_MASK, SUM, UXL_SXL
from pyvirt.cpu.riscv.decode import Insn
from pyvirt.cpu.riscv.x86asm import (
    ALU_ADD,
    ALU_AND,
    ALU_CMP,
    ALU_OR,
    ALU_SUB,
    ALU_XOR,
    CC_A,
    CC_AE,
    CC_B,
    CC_E,
    CC_GE,
    CC_L,
    CC_NE,
    R8,
    R9,
    R11,
    RAX,
    RCX,
    RDI,
    RDX,
    RSI,
    SAR,
    SHL,
    SHR,
    Asm,
    Label,
)
from pyvirt.engines import native_available
from pyvirt.errors import ConfigError
from pyvirt.memory import want_huge_pages

M64 = (1 << 64) - 1

# State buffer layout (8-byte words).
W_X = 0            # x0..x31
W_RET = 32         # instructions retired by native code since the last call returned
W_TLB_R = 33       # address of the current read table
W_TLB_W = 34       # address of the current write table
W_TLB_X = 35       # address of the current fetch table: (vpn, ppn)
W_JMP = 36         # address of the current privilege's jump table
W_MSTATUS = 37     # mstatus as stored (Hart.mstatus)
W_MIP = 38         # Hart.mip
W_MIE = 39         # Hart.mie
W_RESV = 40        # LR reservation: offset in RAM, or -1 (Hart.resv)
W_RAM = 41         # host address of guest RAM
W_SSCRATCH, W_SEPC, W_SCAUSE, W_STVAL = 42, 43, 44, 45   # Hart.sscratch ... stval
W_TLB_S0 = 46      # S-mode's read/write tables with SUM=0 ...
W_TLB_S1 = 47      # ... and with SUM=1 (hart.S_SUM)
W_RESYNC = 48      # set by native code that switched them: the hart re-reads its context
W_TAG = 49         # the current address space's tag, in bits 52-63 (see TAG_SHIFT)
# The native page walk (walk_code) reads these; the hart keeps them up to date.
W_SATP = 50        # Hart.satp
W_PRIV = 51        # Hart.priv
W_RAMBASE = 52     # guest-physical address of RAM ...
W_RAMSIZE = 53     # ... and its size
W_PFLAGS = 54      # host address of the bus's page flags (memory.Bus.page_flags)
W_SPTAB = 55       # host address of the hart's superpage table (SP_ENTRIES words, see Hart)
W_WALK_R = 56      # the walk routine native code calls on a read-table miss ...
W_WALK_W = 57      # ... and on a write-table miss (walk_code; or one that always declines)
W_NWALKS = 58      # TLB refills the native walk made (a counter for bench/tlb_counters.py)
W_WALK_X = 59      # the walk routine for instruction fetches (walk_code's "fetch", or "decline")
W_NFWALKS = 60     # fetch-table refills the native walk made (of W_NWALKS, for tlb_counters.py)
W_PC0 = 61         # the virtual pc the running block was entered at (its first instruction stores rax)
W_MCOUNTEREN = 62  # Hart.mcounteren ...
W_SCOUNTEREN = 63  # ... and Hart.scounteren: may this privilege read `time` (bit 1, TM)?
# rdtime in native code: clock_gettime(CLOCK_MONOTONIC) through the C library, less the
# clock's offset, divided into ticks, exactly as clock.Clock.ticks does it.  The engine sets
# the offset and the divisor (0: no native rdtime) at each slice (Engine.run).
W_CLK_OFF = 64     # Clock: host monotonic ns at guest tick 0
W_CLK_DIV = 65     # Clock: host ns per tick, or 0
W_TIME_FN = 66     # host address of clock_gettime
STATE_WORDS = 72
SP_BITS = 10
SP_ENTRIES = 1 << SP_BITS   # superpage table: superpage numbers (all ones: empty) ...
SP_HASH = 0x9E3779B97F4A7C15   # ... hashed by multiplication: the kernel's text and its
# linear map start at superpage numbers equal modulo any power of two


def sp_slot(spn: int) -> int:
    """The superpage table's slot for superpage number `spn` (as walk_code computes it)."""
    return ((spn * SP_HASH) & M64) >> (64 - SP_BITS)
TLB_ENTRIES = 4096
TLB_BYTES = TLB_ENTRIES * 16
LOOP_BUDGET = 20_000
CHAIN_BUDGET = 20_000      # instructions native code runs before returning to Python
LINK = 1 << 31             # marks a far jump that `link` may point at another block (see _BlockGen._exit)
LINKED_ENTRY = 14          # bytes of each block's linked-entry prologue (_BlockGen.emit)
JMP_ENTRIES = 1 << 17     # jump table: (pc, ppn, code address, unused) per entry
JMP_SET_BITS = 16          # two-way sets: 2**16 sets of two entries
JMP_HASH = 0x9E3779B97F4A7C15   # set = (pc * JMP_HASH mod 2**64) >> (64 - JMP_SET_BITS)
JMP_BYTES = JMP_ENTRIES * 32
# TLB entries are tagged: a non-global entry's first word is vpn ^ (tag << TAG_SHIFT)
# with the tag of its address space (hart.py gives each ASID one), a global entry's
# (and M-mode's) is the bare vpn.  A virtual page number has at most 52 bits, so
# the tag never overlaps it; tag 4095 is never used, so no entry equals the empty
# marker (all ones).
TAG_SHIFT = 52
VPN_MASK = (1 << TAG_SHIFT) - 1
TAG_LIMIT = 4095

R10 = 10

_BRANCH_CC = {"beq": CC_E, "bne": CC_NE, "blt": CC_L, "bge": CC_GE, "bltu": CC_B, "bgeu": CC_AE}
_DIRECT = {*_BRANCH_CC, "jal"}          # jumps whose target is pc + imm
_ALU_R = {"add": ALU_ADD, "sub": ALU_SUB, "and": ALU_AND, "or": ALU_OR, "xor": ALU_XOR}
_ALU_I = {"addi": ALU_ADD, "andi": ALU_AND, "ori": ALU_OR, "xori": ALU_XOR}
_SHIFT = {"sll": SHL, "srl": SHR, "sra": SAR, "slli": SHL, "srli": SHR, "srai": SAR,
          "sllw": SHL, "srlw": SHR, "sraw": SAR, "slliw": SHL, "srliw": SHR, "sraiw": SAR}
_LOADS = {"lb": (1, True), "lh": (2, True), "lw": (4, True), "ld": (8, False),
          "lbu": (1, False), "lhu": (2, False), "lwu": (4, False)}
_STORES = {"sb": 1, "sh": 2, "sw": 4, "sd": 8}
_AMO = {"amoadd": ALU_ADD, "amoand": ALU_AND, "amoor": ALU_OR, "amoxor": ALU_XOR, "amoswap": None}
AMOS = {f"{op}_{w}": (alu, 4 if w == "w" else 8) for op, alu in _AMO.items() for w in ("w", "d")}
_DIVS = {"div": (True, False, True), "divu": (False, False, True), "rem": (True, True, True),
         "remu": (False, True, True), "divw": (True, False, False), "divuw": (False, False, False),
         "remw": (True, True, False), "remuw": (False, True, False)}   # signed, remainder, 64-bit
_LRSC = {"lr_w": 4, "lr_d": 8, "sc_w": 4, "sc_d": 8}
MEMORY_OPS = set(_LOADS) | set(_STORES) | set(AMOS) | set(_LRSC)
SUPPORTED = (set(_BRANCH_CC) | set(_ALU_R) | set(_ALU_I) | set(_SHIFT) | set(_LOADS) | set(_STORES)
             | set(AMOS) | set(_DIVS) | set(_LRSC) | {"lui", "auipc", "jal", "jalr", "slt", "sltu", "slti", "sltiu", "addw", "subw", "addiw",
                "mul", "mulw", "mulh", "mulhu", "fence"})


# Instructions whose machine code depends only on the instruction (not on its pc
# or place in the block) and whose only jumps go to their TLB-miss exit.
_SNIPPET_OPS = ((set(_ALU_R) | set(_ALU_I) | set(_SHIFT) | set(_LOADS) | set(_STORES) | set(AMOS))
                | {"lui", "slt", "sltu", "slti", "sltiu", "addw", "subw", "addiw",
                   "mul", "mulw", "mulh", "mulhu", "fence"})
_SNIPPETS: dict[Insn, tuple[bytes, tuple[int, ...]]] = {}
_SNIPPET_LIMIT = 1 << 16


CSR_SSTATUS = 0x100
CSR_TIME = 0xC01
CLOCK_MONOTONIC = 1
# The counter-enable words whose TM bit (1) a privilege needs to read `time`.
_TM_WORDS = {0: (W_MCOUNTEREN, W_SCOUNTEREN), 1: (W_MCOUNTEREN,), 3: ()}
_CSR_OPS = {"csrrw": (1, False), "csrrs": (2, False), "csrrc": (3, False),
            "csrrwi": (1, True), "csrrsi": (2, True), "csrrci": (3, True)}
_SSTATUS_WRITABLE = SIE | SPIE | SPP | FS | SUM | MXR
# Bits a native sstatus write may change: nothing but sret, FP instructions and interrupt
# delivery reads them, and those read the state buffer.  (SUM switches S's TLB context.)
_SSTATUS_NATIVE = SIE | SPIE | SPP | FS


# S-mode CSRs without side effects, kept in the state buffer: number -> (word, write mask).
PLAIN_CSRS = {0x140: (W_SSCRATCH, M64), 0x141: (W_SEPC, M64 & ~1),
              0x142: (W_SCAUSE, M64), 0x143: (W_STVAL, M64)}


def supported(ins: Insn, priv: int) -> bool:
    """Whether the native tier translates `ins` in a block run at privilege `priv`."""
    name = ins.name
    if name in SUPPORTED:
        return True
    if name in _CSR_OPS:
        if ins.imm == CSR_TIME:
            # rdtime (csrrs/csrrc with x0 or zimm 0: a pure read; any write is illegal),
            # from any privilege: the kernel's clocksource, the C library's clock_gettime.
            return _CSR_OPS[name][0] != 1 and ins.rs1 == 0
        # sstatus from S- or M-mode: the kernel's interrupt enable/disable.
        return (ins.imm == CSR_SSTATUS or ins.imm in PLAIN_CSRS) and priv >= 1
    return False


def clock_gettime_address() -> int:
    """The host address of the C library's clock_gettime (what native rdtime calls)."""
    fn = ctypes.CDLL(None).clock_gettime
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


def available() -> bool:
    return native_available()


def _reg(r: int) -> int:
    return 8 * (W_X + r)


class CodeBuffer:
    """Executable memory for native blocks, handed out bump-pointer style.

    Each chunk starts with the chaining stub (`_chain_stub`) that every block
    in it jumps to when it leaves."""

    CHUNK = 4 << 20

    def __init__(self) -> None:
        self._chunks: list[mmap.mmap] = []
        # The chunks are unmapped when the buffer is dropped (Translator.reset).
        self._free = 0
        self._base = 0
        self._stub = 0

    def put(self, code: bytes | bytearray, far: list[int] = []) -> int:   # noqa: B006 - read only
        """Place `code`; its far jumps (rel32 offsets at `far`) go to the chunk's stub."""
        if not self._chunks or self._free + len(code) > self.CHUNK:
            m = mmap.mmap(-1, self.CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            want_huge_pages(m)                  # (the code of a distribution's boot spans many MiB)
            self._chunks.append(m)
            self._base = ctypes.addressof(ctypes.c_char.from_buffer(m))
            stub = _chain_stub()
            memoryview(m)[:len(stub)] = stub
            self._stub = self._base
            self._free = (len(stub) + 15) & ~15
        m = self._chunks[-1]
        at = self._free
        addr = self._base + at
        if far:
            code = bytearray(code)
            for off in far:
                off &= ~LINK
                struct.pack_into("<i", code, off, self._stub - (addr + off + 4))
        memoryview(m)[at:at + len(code)] = code
        self._free = (at + len(code) + 15) & ~15
        return addr


def _chain_stub() -> bytes:
    """rax = next pc.  If the chaining budget allows and the native fetch TLB maps pc's
    page, jump to the native block the jump table has for that physical address (the
    same code serves every virtual address of the page: `_BlockGen._mov_pc`); else
    return rax to Python.  So a process that maps a library page at new addresses runs
    the code made for it without leaving native code."""
    a = Asm()
    out = a.label()
    a.load(RCX, RDI, 8 * W_RET)
    a.alu_imm(ALU_CMP, RCX, CHAIN_BUDGET)
    a.jcc(CC_GE, out)
    a.mov(RDX, RAX)
    a.shift_imm(SHR, RDX, 12)
    a.mov32(R8, RDX)
    a.alu_imm(ALU_AND, R8, TLB_ENTRIES - 1, w=False)
    a.shift_imm(SHL, R8, 4, w=False)
    a.alu_mem(ALU_ADD, R8, RDI, 8 * W_TLB_X)
    hit = a.label()
    a.alu_mem(ALU_CMP, RDX, R8, 0)                 # a global entry
    a.jcc(CC_E, hit)
    a.alu_mem(ALU_XOR, RDX, RDI, 8 * W_TAG)
    a.alu_mem(ALU_CMP, RDX, R8, 0)                 # the current address space's
    a.jcc(CC_NE, out)
    a.bind(hit)
    a.load(RCX, R8, 8)                             # the physical page
    a.shift_imm(SHL, RCX, 12)
    a.mov32(RDX, RAX)
    a.alu_imm(ALU_AND, RDX, 0xFFF, w=False)
    a.alu(ALU_OR, RCX, RDX)                        # rcx = the physical address of pc
    a.mov_imm(RDX, JMP_HASH)
    a.imul(RDX, RCX)
    a.shift_imm(SHR, RDX, 64 - JMP_SET_BITS)
    a.shift_imm(SHL, RDX, 6, w=False)
    a.alu_mem(ALU_ADD, RDX, RDI, 8 * W_JMP)
    found = a.label()
    a.alu_mem(ALU_CMP, RCX, RDX, 0)
    a.jcc(CC_E, found)
    a.alu_imm(ALU_ADD, RDX, 32)
    a.alu_mem(ALU_CMP, RCX, RDX, 0)
    a.jcc(CC_NE, out)
    a.bind(found)
    a.jmp_mem(RDX, 16)
    a.bind(out)
    a.ret()
    return a.finish()


def far_jump_fits(off: int, size: int) -> bool:
    """Whether a far-jump offset (with its LINK mark) fits code of `size` bytes (the code
    cache checks what it reads back)."""
    pos = off & ~LINK
    return pos + 4 <= size and (not off & LINK or pos >= 12)


def direct_exits(code: bytes | bytearray, far: Sequence[int]) -> list[tuple[int, int]]:
    """(offset of the rel32, distance k of the target from the block's entry pc) of each
    exit to a pc fixed by the guest code: a jump marked LINK follows `mov rax, k; add rax,
    [rdi + 8 * W_PC0]` (_BlockGen._exit), so k is the simm32 12 bytes before the rel32."""
    out = []
    for off in far:
        if off & LINK:
            pos = off & ~LINK
            out.append((pos, int.from_bytes(code[pos - 12:pos - 8], "little", signed=True)))
    return out


def link(site: int, entry: int) -> bool:
    """Point the exit jump whose rel32 is at host address `site` straight at the native
    block entered at `entry` (through its linked entry, which checks the chaining budget);
    False if the distance does not fit a rel32 (the exit keeps going to the chain stub)."""
    disp = entry - LINKED_ENTRY - (site + 4)
    if not -(1 << 31) <= disp < 1 << 31:
        return False
    ctypes.c_int32.from_address(site).value = disp
    return True


# -- the native page walk -----------------------------------------------------------------------
# PTE bits (mmu.py) and mstatus bits the walk reads.
_V, _R, _W, _X, _U, _G, _A, _D = (1 << i for i in range(8))
WALK_MUTATIONS = ("perm", "superpage", "nonleaf", "ad", "global", "exec")
PF_WATCHED = 1       # memory.Bus.page_flags: the page is watched (holds translated code) ...
PF_NATIVE_W = 2      # ... a native walk gave some hart a write entry for it


def walk_code(mutation: str | None = None) -> tuple[bytes, dict[str, int]]:
    """The out-of-line TLB refill native blocks call on a miss (`call [rdi + W_WALK_R/W]`),
    with rax = the virtual address, rdi = the state buffer; "fetch" (`[rdi + W_WALK_X]`)
    does the same for an instruction fetch.

    It walks the Sv39/Sv48 tables in RAM exactly as mmu.walk does and, for an S- or
    U-mode access that mmu.walk would allow to a RAM page, sets A (and D for a store)
    with lock cmpxchg, fills the read entry (and the write entry for a store) of the
    current tables as Hart.translate does and returns ZF=1, rdx = the entry.  Anything
    else — a fault, a PTE or page outside RAM, M-mode, a bare satp, a watched page or a
    running dirty log for a store, an A/D update while a dirty log runs or to a PTE in a
    watched page, a superpage whose slot in the hart's superpage table another holds, a PTE
    that changed under it — returns ZF=0 having changed nothing, and the block leaves
    for the Python path, which raises the precise trap or fills the TLB itself.
    rax, rdi and r10 are kept; rcx, rdx, rsi, r8, r9 and r11 are not.

    A fetch needs X (MXR does not apply), a U page only in U-mode (SUM does not apply),
    sets A alone, and fills the entry of the current privilege's fetch table (vpn tag,
    ppn) as Hart.translate does; on return r9 is the page's offset in RAM and r11 holds
    the walk's G bit (bit 5) and 12 + 9 * level (bits 8-15).  "fetch_c" is its C entry
    (state, va) -> 0 declined, else the page's physical address | 1 | 2 if global |
    (12 + 9 * level) << 4: what Hart.translate calls in place of mmu.walk for a fetch.

    Also: "scan" (a C function: table, entries, host page address) drops the entries of
    a write table that map that page, and "test" (state, va, is_store) -> filled calls
    the routine the state buffer names.  `mutation` breaks one rule on purpose (tests
    show that they notice): "perm" skips the U/SUM check, "superpage" the alignment
    check, "nonleaf" the invalid-PTE check below the root, "ad" updates A/D without
    lock cmpxchg, "global" ignores G, "exec" lets a fetch through without X."""
    if mutation is not None and mutation not in WALK_MUTATIONS:
        raise ValueError(f"unknown walk mutation {mutation!r}")
    a = Asm()
    offs: dict[str, int] = {}
    fail, common = a.label(), a.label()
    offs["decline"] = 0
    a.bind(fail)
    a.alu_imm(ALU_CMP, RDI, 0)                     # ZF = 0: nothing filled
    a.ret()
    offs["fetch"] = len(a.buf)
    a.mov_imm(R11, 2)                              # r11: bit 1 fetch
    a.jmp(common)
    offs["load"] = len(a.buf)
    a.alu(ALU_XOR, R11, R11, w=False)              # r11: bit 0 store, bit 5 (PTE.G) global
    a.jmp(common)
    offs["store"] = len(a.buf)
    a.mov_imm(R11, 1)
    a.bind(common)
    a.load(RDX, RDI, 8 * W_PRIV)
    a.alu_imm(ALU_CMP, RDX, 1)
    a.jcc(CC_A, fail)                              # M-mode: no translation
    a.load(RSI, RDI, 8 * W_SATP)
    a.mov(RDX, RSI)
    a.shift_imm(SHR, RDX, 60)
    sv39, go = a.label(), a.label()
    a.alu_imm(ALU_CMP, RDX, 8)
    a.jcc(CC_E, sv39)
    a.alu_imm(ALU_CMP, RDX, 9)
    a.jcc(CC_NE, fail)                             # bare
    a.mov_imm(RCX, 39)                             # cl = 12 + 9 * level
    a.mov(RDX, RAX)
    a.shift_imm(SAR, RDX, 47)
    a.jmp(go)
    a.bind(sv39)
    a.mov_imm(RCX, 30)
    a.mov(RDX, RAX)
    a.shift_imm(SAR, RDX, 38)
    a.bind(go)
    a.alu_imm(ALU_ADD, RDX, 1)                     # the bits above the VA: all 0 or all 1
    a.alu_imm(ALU_CMP, RDX, 1)
    a.jcc(CC_A, fail)
    a.shift_imm(SHL, RSI, 20)
    a.shift_imm(SHR, RSI, 8)                       # rsi = root table (satp.PPN << 12)
    loop, leaf = a.label(), a.label()
    a.bind(loop)
    a.mov(RDX, RAX)
    a.shift_cl(SHR, RDX)
    a.alu_imm(ALU_AND, RDX, 511, w=False)
    a.shift_imm(SHL, RDX, 3, w=False)
    a.alu(ALU_ADD, RDX, RSI)                       # the PTE's physical address
    a.alu_mem(ALU_SUB, RDX, RDI, 8 * W_RAMBASE)
    a.alu_mem(ALU_CMP, RDX, RDI, 8 * W_RAMSIZE)
    a.jcc(CC_AE, fail)                             # not in RAM
    a.alu_mem(ALU_ADD, RDX, RDI, 8 * W_RAM)        # rdx = its host address
    a.load(R8, RDX, 0)                             # r8 = the PTE
    a.mov(RSI, R8)
    a.shift_imm(SHR, RSI, 54)
    a.jcc(CC_NE, fail)                             # reserved bits, PBMT, N
    skip_v = a.label()
    if mutation == "nonleaf":
        a.alu_imm(ALU_CMP, RCX, 30, w=False)
        a.jcc(CC_B, skip_v)                        # below the top of Sv39: V not checked
    a.test_imm(R8, _V)
    a.jcc(CC_E, fail)
    a.bind(skip_v)
    a.mov32(RSI, R8)
    a.alu_imm(ALU_AND, RSI, _R | _W, w=False)
    a.alu_imm(ALU_CMP, RSI, _W, w=False)
    a.jcc(CC_E, fail)                              # write-only: reserved
    if mutation != "global":
        a.mov32(RSI, R8)
        a.alu_imm(ALU_AND, RSI, _G, w=False)
        a.alu(ALU_OR, R11, RSI)
    a.test_imm(R8, _R | _X)
    a.jcc(CC_NE, leaf)
    a.alu_imm(ALU_CMP, RCX, 12, w=False)
    a.jcc(CC_E, fail)                              # no leaf at level 0
    a.test_imm(R8, _A | _D | _U)
    a.jcc(CC_NE, fail)                             # reserved in a non-leaf PTE
    a.mov(RSI, R8)
    a.shift_imm(SHR, RSI, 10)
    a.shift_imm(SHL, RSI, 12)                      # the next table
    a.alu_imm(ALU_SUB, RCX, 9, w=False)
    a.jmp(loop)

    a.bind(leaf)                                   # permissions (4.3.2 step 5)
    notu, access, store, ok, fetch = a.label(), a.label(), a.label(), a.label(), a.label()
    a.mov(RSI, RCX)
    a.shift_imm(SHL, RSI, 8)
    a.alu(ALU_OR, R11, RSI)                        # r11 bits 8-15: 12 + 9 * level
    a.load(RSI, RDI, 8 * W_PRIV)
    a.test_imm(R8, _U)
    a.jcc(CC_E, notu)
    if mutation != "perm":
        a.alu_imm(ALU_CMP, RSI, 1)
        a.jcc(CC_NE, access)                       # U-mode, U page
        a.test_imm(R11, 2)
        a.jcc(CC_NE, fail)                         # S-mode fetch, U page (SUM or not)
        a.load(RSI, RDI, 8 * W_MSTATUS)
        a.test_imm(RSI, SUM)
        a.jcc(CC_E, fail)                          # S-mode, U page, SUM clear
    a.jmp(access)
    a.bind(notu)
    a.alu_imm(ALU_CMP, RSI, 0)
    a.jcc(CC_E, fail)                              # U-mode, S page
    a.bind(access)
    a.test_imm(R11, 1)
    a.jcc(CC_NE, store)
    a.test_imm(R11, 2)
    a.jcc(CC_NE, fetch)
    a.test_imm(R8, _R)
    a.jcc(CC_NE, ok)
    a.test_imm(R8, _X)
    a.jcc(CC_E, fail)
    a.load(RSI, RDI, 8 * W_MSTATUS)
    a.test_imm(RSI, MXR)                           # executable pages readable with MXR
    a.jcc(CC_E, fail)
    a.jmp(ok)
    a.bind(fetch)
    if mutation != "exec":
        a.test_imm(R8, _X)
        a.jcc(CC_E, fail)                          # a fetch needs X, whatever MXR says
    a.jmp(ok)
    a.bind(store)
    a.test_imm(R8, _W)
    a.jcc(CC_E, fail)
    a.bind(ok)
    small = a.label()
    a.alu_imm(ALU_CMP, RCX, 12, w=False)
    a.jcc(CC_E, small)
    a.mov(RSI, RAX)                                # a superpage: the hart must know it
    a.shift_cl(SHR, RSI)                           # (for sfence.vma va): its number in the
    a.mov_imm(R9, SP_HASH)                         # superpage table (sp_slot), put there
    a.imul(R9, RSI)                                # now if the slot is free; another
    a.shift_imm(SHR, R9, 64 - SP_BITS)             # superpage's slot: Python's
    a.shift_imm(SHL, R9, 3, w=False)               # (Hart.superpages)
    a.alu_mem(ALU_ADD, R9, RDI, 8 * W_SPTAB)
    a.alu_mem(ALU_CMP, RSI, R9, 0)
    a.jcc(CC_E, small)
    a.cmp_mem_imm(R9, 0, -1)
    a.jcc(CC_NE, fail)
    a.store(R9, 0, RSI)
    a.bind(small)
    a.mov_imm(RSI, 1)
    a.shift_cl(SHL, RSI)
    a.alu_imm(ALU_SUB, RSI, 1)                     # rsi = offset mask of the leaf's page
    a.mov(R9, R8)
    a.shift_imm(SHR, R9, 10)
    a.shift_imm(SHL, R9, 12)                       # r9 = the leaf's physical address
    if mutation != "superpage":
        a.mov(RCX, R9)
        a.alu(ALU_AND, RCX, RSI)
        a.jcc(CC_NE, fail)                         # misaligned superpage
    a.mov(RCX, RAX)
    a.alu(ALU_AND, RCX, RSI)
    a.alu_imm(ALU_AND, RCX, -4096)
    a.alu(ALU_OR, R9, RCX)                         # r9 = the 4 KiB page's physical address
    a.alu_mem(ALU_SUB, R9, RDI, 8 * W_RAMBASE)
    a.alu_mem(ALU_CMP, R9, RDI, 8 * W_RAMSIZE)
    a.jcc(CC_AE, fail)                             # not RAM: r9 = offset in RAM from here
    a.load(RSI, RDI, 8 * W_PFLAGS)
    ad = a.label()
    a.test_imm(R11, 1)
    a.jcc(CC_E, ad)
    a.load(RCX, RDI, 8 * W_RAMSIZE)                # stores: no dirty-page log running ...
    a.shift_imm(SHR, RCX, 12)
    a.alu(ALU_ADD, RCX, RSI)
    a.load_sized(RCX, RCX, 1, False)
    a.test_imm(RCX, 1)
    a.jcc(CC_NE, fail)
    a.mov(RCX, R9)                                 # ... and not a page holding code
    a.shift_imm(SHR, RCX, 12)
    a.alu(ALU_ADD, RCX, RSI)
    a.load_sized(RCX, RCX, 1, False)
    a.test_imm(RCX, PF_WATCHED)
    a.jcc(CC_NE, fail)
    a.bind(ad)
    done_ad, want = a.label(), a.label()
    a.mov_imm(RSI, _A)
    a.test_imm(R11, 1)
    a.jcc(CC_E, want)
    a.mov_imm(RSI, _A | _D)
    a.bind(want)
    a.mov(RCX, R8)
    a.alu(ALU_AND, RCX, RSI)
    a.alu(ALU_CMP, RCX, RSI)
    a.jcc(CC_E, done_ad)
    a.load(RCX, RDI, 8 * W_RAMSIZE)                # an A/D update writes guest memory: not
    a.shift_imm(SHR, RCX, 12)                      # while a dirty-page log runs (Python's
    a.alu_mem(ALU_ADD, RCX, RDI, 8 * W_PFLAGS)     # bus.write marks the table's page)
    a.load_sized(RCX, RCX, 1, False)
    a.test_imm(RCX, 1)
    a.jcc(CC_NE, fail)
    a.mov(RCX, RDX)                                # nor in a page holding code (the bus
    a.alu_mem(ALU_SUB, RCX, RDI, 8 * W_RAM)        # write would tell its watchers)
    a.shift_imm(SHR, RCX, 12)
    a.alu_mem(ALU_ADD, RCX, RDI, 8 * W_PFLAGS)
    a.load_sized(RCX, RCX, 1, False)
    a.test_imm(RCX, PF_WATCHED)
    a.jcc(CC_NE, fail)
    a.alu(ALU_OR, RSI, R8)
    if mutation == "ad":
        a.store(RDX, 0, RSI)                       # broken: a plain write of what was read
    else:
        a.mov(RCX, RAX)
        a.mov(RAX, R8)
        a.lock_cmpxchg(RDX, RSI)                   # only if the PTE is still what was walked
        a.mov(RAX, RCX)
        a.jcc(CC_NE, fail)
    a.bind(done_ad)
    # The entries, as Hart.translate makes them.
    a.mov(RCX, RAX)
    a.shift_imm(SHR, RCX, 12)
    glob = a.label()
    a.test_imm(R11, _G)
    a.jcc(CC_NE, glob)
    a.alu_mem(ALU_XOR, RCX, RDI, 8 * W_TAG)        # rcx = the entry's tag word
    a.bind(glob)
    fetch_fill = a.label()
    a.test_imm(R11, 2)
    a.jcc(CC_NE, fetch_fill)
    a.mov(R8, R9)                                  # r8 = offset in RAM
    a.alu_mem(ALU_ADD, R9, RDI, 8 * W_RAM)
    a.mov(RSI, RAX)
    a.alu_imm(ALU_AND, RSI, -4096)
    a.alu(ALU_SUB, R9, RSI)                        # r9 = addend (host = va + addend)
    a.mov(RDX, RAX)
    a.shift_imm(SHR, RDX, 12)
    a.alu_imm(ALU_AND, RDX, TLB_ENTRIES - 1, w=False)
    a.shift_imm(SHL, RDX, 4, w=False)
    a.mov(RSI, RDX)
    a.alu_mem(ALU_ADD, RDX, RDI, 8 * W_TLB_R)
    a.store(RDX, 0, RCX)
    a.store(RDX, 8, R9)
    a.add_mem_imm(RDI, 8 * W_NWALKS, 1)
    filled = a.label()
    a.test_imm(R11, 1)
    a.jcc(CC_E, filled)
    a.alu_mem(ALU_ADD, RSI, RDI, 8 * W_TLB_W)
    a.store(RSI, 0, RCX)
    a.store(RSI, 8, R9)
    a.mov(RDX, RSI)
    a.shift_imm(SHR, R8, 12)
    a.alu_mem(ALU_ADD, R8, RDI, 8 * W_PFLAGS)
    a.lock_or_byte(R8, PF_NATIVE_W)                # (a full barrier before the check below)
    a.load(R8, RDI, 8 * W_RAMSIZE)
    a.shift_imm(SHR, R8, 12)
    a.alu_mem(ALU_ADD, R8, RDI, 8 * W_PFLAGS)
    a.load_sized(R8, R8, 1, False)
    a.test_imm(R8, 1)
    a.jcc(CC_E, filled)
    a.store_imm32(RSI, 0, -1)                      # a dirty log started meanwhile: take it back
    a.jmp(fail)
    a.bind(filled)
    a.alu(ALU_CMP, RAX, RAX)                       # ZF = 1: filled
    a.ret()

    a.bind(fetch_fill)                             # the fetch table's entry: (tag word, ppn)
    a.mov(RDX, RAX)
    a.shift_imm(SHR, RDX, 12)
    a.alu_imm(ALU_AND, RDX, TLB_ENTRIES - 1, w=False)
    a.shift_imm(SHL, RDX, 4, w=False)
    a.alu_mem(ALU_ADD, RDX, RDI, 8 * W_TLB_X)
    a.store(RDX, 0, RCX)
    a.mov(RSI, R9)
    a.alu_mem(ALU_ADD, RSI, RDI, 8 * W_RAMBASE)
    a.shift_imm(SHR, RSI, 12)
    a.store(RDX, 8, RSI)
    a.add_mem_imm(RDI, 8 * W_NWALKS, 1)
    a.add_mem_imm(RDI, 8 * W_NFWALKS, 1)
    a.alu(ALU_CMP, RAX, RAX)
    a.ret()

    offs["scan"] = len(a.buf)                      # (table, entries, host page address)
    top, nxt, end = a.label(), a.label(), a.label()
    a.mov_imm(R8, VPN_MASK)
    a.bind(top)
    a.alu_imm(ALU_CMP, RSI, 0)
    a.jcc(CC_E, end)
    a.load(RAX, RDI, 0)
    a.alu(ALU_AND, RAX, R8)
    a.shift_imm(SHL, RAX, 12)
    a.alu_mem(ALU_ADD, RAX, RDI, 8)
    a.alu(ALU_CMP, RAX, RDX)
    a.jcc(CC_NE, nxt)
    a.store_imm32(RDI, 0, -1)
    a.bind(nxt)
    a.alu_imm(ALU_ADD, RDI, 16)
    a.alu_imm(ALU_SUB, RSI, 1)
    a.jmp(top)
    a.bind(end)
    a.ret()

    offs["test"] = len(a.buf)                      # (state, va, is_store) -> filled
    st, back = a.label(), a.label()
    a.mov(RAX, RSI)
    a.alu_imm(ALU_CMP, RDX, 0)
    a.jcc(CC_NE, st)
    a.call_mem(RDI, 8 * W_WALK_R)
    a.jmp(back)
    a.bind(st)
    a.call_mem(RDI, 8 * W_WALK_W)
    a.bind(back)
    a.setcc(CC_E, RAX)
    a.ret()

    offs["fetch_c"] = len(a.buf)                   # (state, va) -> see above
    no = a.label()
    a.mov(RAX, RSI)
    a.call_mem(RDI, 8 * W_WALK_X)
    a.jcc(CC_NE, no)
    a.mov(RAX, R11)
    a.shift_imm(SHR, RAX, 4)
    a.alu_imm(ALU_AND, RAX, 0xFF2, w=False)        # G -> bit 1, 12 + 9 * level -> bits 4-11
    a.alu_mem(ALU_ADD, R9, RDI, 8 * W_RAMBASE)
    a.alu(ALU_OR, RAX, R9)
    a.alu_imm(ALU_OR, RAX, 1)
    a.ret()
    a.bind(no)
    a.alu(ALU_XOR, RAX, RAX, w=False)
    a.ret()
    return a.finish(), offs


class Walker:
    """walk_code placed in executable memory of its own (one per process and mutation;
    it is never freed: native blocks of any code buffer may call it)."""

    def __init__(self, mutation: str | None = None) -> None:
        code, offs = walk_code(mutation)
        self._map = mmap.mmap(-1, (len(code) + 4095) & ~4095, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._map[:len(code)] = code
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.addr = {k: base + v for k, v in offs.items()}
        self.scan = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)(self.addr["scan"])
        self.test = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64,
                                     ctypes.c_uint64)(self.addr["test"])
        self.fetch = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)(self.addr["fetch_c"])


_WALKERS: dict[str | None, Walker] = {}


def walker(mutation: str | None = None) -> Walker:
    w = _WALKERS.get(mutation)
    if w is None:
        w = _WALKERS[mutation] = Walker(mutation)
    return w


def walk_setting() -> tuple[bool, str | None]:
    """PYVIRT_NATIVE_WALK: unset or "on" (the native walk), "off" (every miss goes to
    Python, as before it existed), or "broken-<mutation>" (tests: see walk_code)."""
    v = os.environ.get("PYVIRT_NATIVE_WALK", "on").lower()
    if v in ("on", "1", "yes", ""):
        return True, None
    if v in ("off", "0", "no"):
        return False, None
    if v.startswith("broken-") and v[7:] in WALK_MUTATIONS:
        return True, v[7:]
    raise ConfigError(f"PYVIRT_NATIVE_WALK must be on, off or broken-<{'|'.join(WALK_MUTATIONS)}>, "
                      f"not {v[:40]!r}")


def fetch_walk_setting() -> bool:
    """PYVIRT_NATIVE_FETCH_WALK: unset or "on" (instruction-fetch misses use the native walk
    too, where PYVIRT_NATIVE_WALK is on), or "off" (they go to mmu.walk, as before)."""
    v = os.environ.get("PYVIRT_NATIVE_FETCH_WALK", "on").lower()
    if v in ("on", "1", "yes", ""):
        return True
    if v in ("off", "0", "no"):
        return False
    raise ConfigError(f"PYVIRT_NATIVE_FETCH_WALK must be on or off, not {v[:40]!r}")


_EXIT_COUNT: dict[tuple[bool, int], bytes] = {}
_PACK_I, _PACK_SI = struct.Struct("<I").pack, struct.Struct("<i").pack
# cmp qword [rdi + 8 * W_RET], CHAIN_BUDGET; jl +1; ret
_LINKED_PROLOGUE = b"\x48\x81\xbf" + _PACK_SI(8 * W_RET) + _PACK_SI(CHAIN_BUDGET) + b"\x7c\x01\xc3"
assert len(_LINKED_PROLOGUE) == LINKED_ENTRY


# pc constants: rax (or another register) = [W_PC0] + k, where k is a distance within the
# guest code; see _BlockGen._mov_pc.
_PC0_DISP = _PACK_I(8 * W_PC0)


class Translator:
    """Turns a decoded block into x86-64 code; `None` if nothing in it is native."""

    def __init__(self) -> None:
        self.code = CodeBuffer()
        self.used = 0                   # bytes of code in the current buffer
        self.stats = {"native_blocks": 0, "native_bytes": 0}
        self.last: tuple[bytes, list[int]] = (b"", [])    # the last translation's code and far jumps

    def reset(self) -> None:
        """Forget every translation: the code buffer's memory goes back to the
        host.  Only when no native code can run any more (the engine's flush,
        from Python, with every table that points into the buffer cleared)."""
        self.code = CodeBuffer()
        self.used = 0

    def translate(self, insns: list[tuple[Insn, int]], priv: int = 0) -> tuple[int, int] | None:
        """(code address, number of instructions covered) or None.

        The code is the same for these guest bytes at any virtual page: it finds its
        pc in [W_PC0] (see _BlockGen._mov_pc), so one translation serves every address
        space that maps the page at the same page offset (`native_entry`)."""
        cut = 0
        for ins, _ in insns:
            if not supported(ins, priv):
                break
            cut += 1
        if cut == 0:
            return None
        block = insns[:cut]
        a = Asm()
        gen = _BlockGen(a, block, insns[cut][1] if cut < len(insns) else None, priv)
        gen.emit()
        code = a.finish()
        self.last = (code, a.far)
        return self.place(code, a.far), cut

    def place(self, code: bytes, far: list[int]) -> int:
        """Put a block's code (made now, or by an earlier run: see codecache.py) into the
        code buffer; its address."""
        addr = self.code.put(code, far) + LINKED_ENTRY
        self.used += len(code)
        self.stats["native_blocks"] += 1
        self.stats["native_bytes"] += len(code)
        return addr


class _BlockGen:
    def __init__(self, a: Asm, insns: list[tuple[Insn, int]], stop_pc: int | None, priv: int = 0) -> None:
        self.a = a
        self.priv = priv
        self.insns = insns
        self.total = len(insns)
        self.entry = insns[0][1]
        self.stop_pc = stop_pc
        entry = self.entry
        self.loop = any((pc + ins.imm) & M64 == entry for ins, pc in insns if ins.name in _DIRECT)
        self.misses: list[tuple[Label, int, int]] = []     # (label, pc, index)

    # -- exits -----------------------------------------------------------------------
    def _exit(self, index: int, target: int | None, odd: bool = False) -> None:
        """Leave after instruction `index` (or before it when `odd`) for `target` (None: rax).

        Counts the instructions retired into [W_RET]; an ordinary exit then tries
        to chain straight into the native block for the target."""
        a = self.a
        done = index if odd else index + 1
        key = (self.loop, done)
        count = _EXIT_COUNT.get(key)
        if count is None:
            # The counting prefix depends on (loop, done) only: encode it once.
            c = Asm()
            if self.loop:
                if done:
                    c.alu_imm(ALU_ADD, R10, done)
                c.alu_mem(ALU_ADD, R10, RDI, 8 * W_RET)
                c.store(RDI, 8 * W_RET, R10)
            elif done:
                c.add_mem_imm(RDI, 8 * W_RET, done)
            count = _EXIT_COUNT[key] = bytes(c.buf)
        a.buf += count
        if target is not None:
            self._mov_pc(RAX, target | (1 if odd else 0))
        if odd:
            a.buf.append(0xC3)                               # ret
        else:
            a.jmp_far(self._link_mark(target))

    def _link_mark(self, target: int | None) -> int:
        """LINK for an exit to a pc fixed by the guest code in the block's own page, whose
        rax was just set by `_mov_pc`'s short form: the engine may point it straight at the
        block there (Engine._link), as every address of the page runs this same code.  (An
        exit elsewhere needs the chain stub: the other page's mapping differs by address
        space.)"""
        if target is None or (target ^ self.entry) >> 12:
            return 0
        assert self.a.buf[-14:-11] == b"\x48\xc7\xc0", "direct_exits reads k from this mov"
        return LINK

    def _mov_pc(self, reg: int, value: int) -> None:
        """reg = `value`, a pc or a value made from one (exit targets, links, auipc): as
        the entry pc in [W_PC0] plus the distance, so that the code does not depend on
        the virtual page it runs at."""
        k = (value - self.entry) & M64
        if k >= 1 << 63:
            k -= 1 << 64
        a = self.a
        if reg == RAX and -(1 << 31) <= k < 1 << 31:
            a.buf += b"\x48\xc7\xc0" + _PACK_SI(k)         # mov rax, simm32
            a.buf += b"\x48\x03\x87" + _PC0_DISP           # add rax, [rdi + 8 * W_PC0]
        else:
            a.mov_imm(reg, k & M64)
            a.alu_mem(ALU_ADD, reg, RDI, 8 * W_PC0)

    def _miss(self, index: int, pc: int) -> Label:
        label = self.a.label()
        self.misses.append((label, pc, index))
        return label

    # -- operands --------------------------------------------------------------------
    def _get(self, dst: int, r: int) -> None:
        if r == 0:
            self.a.alu(ALU_XOR, dst, dst, w=False)
        else:
            self.a.load(dst, RDI, _reg(r))

    def _set(self, r: int, src: int) -> None:
        if r:
            self.a.store(RDI, _reg(r), src)

    # -- the block ---------------------------------------------------------------------
    def emit(self) -> None:
        a = self.a
        # The linked entry: an exit that `link` pointed here comes with rax = this pc and
        # returns it to Python once the chaining budget is spent, as the chain stub does.
        a.buf += _LINKED_PROLOGUE
        a.store(RDI, 8 * W_PC0, RAX)             # entered with rax = its pc (native_entry, the chain stub)
        top = a.label()
        if self.loop:
            a.alu(ALU_XOR, R10, R10, w=False)
        a.bind(top)
        self.top = top
        for i, (ins, pc) in enumerate(self.insns):
            nxt = self.insns[i + 1][1] if i + 1 < self.total else None
            ended = self._insn(i, ins, pc, nxt)
            if ended:
                break
        else:
            # Ran off the end: continue at the first instruction not translated.
            last, lpc = self.insns[-1]
            self._exit(self.total - 1, self.stop_pc if self.stop_pc is not None
                       else (lpc + last.length) & M64)
        for label, pc, index in self.misses:
            a.bind(label)
            self._exit(index, pc, odd=True)

    def _back_edge(self, index: int) -> None:
        """Loop back to the top, or leave for the entry after LOOP_BUDGET instructions."""
        a = self.a
        a.alu_imm(ALU_ADD, R10, index + 1)
        a.alu_imm(ALU_CMP, R10, LOOP_BUDGET)
        a.jcc(CC_L, self.top)
        a.alu_mem(ALU_ADD, R10, RDI, 8 * W_RET)
        a.store(RDI, 8 * W_RET, R10)
        self._mov_pc(RAX, self.entry)
        a.jmp_far(self._link_mark(self.entry))

    def _goto(self, index: int, target: int) -> None:
        if self.loop and target == self.entry:
            self._back_edge(index)
        else:
            self._exit(index, target)

    def _insn(self, i: int, ins: Insn, pc: int, nxt: int | None) -> bool:
        """Emit one instruction; True when it ended the block.

        Straight-line instructions encode the same wherever they are (their only
        jumps go to the instruction's own TLB-miss exit), so their bytes are
        cached by instruction and reused."""
        name = ins.name
        if name in _SNIPPET_OPS:
            a = self.a
            hit = _SNIPPETS.get(ins)
            if hit is not None:
                code, offsets = hit
                base = len(a.buf)
                a.buf += code
                if offsets:
                    label = self._miss(i, pc)
                    for off in offsets:
                        a._fixups.append((base + off, label))
                return False
            start, nfix = len(a.buf), len(a._fixups)
            self._emit_insn(i, ins, pc, nxt)
            snippet = bytearray(a.buf[start:])
            fixes: list[int] = []
            for at, label in a._fixups[nfix:]:
                if label.pos is not None and label.pos >= start:
                    # A jump inside the snippet: relative, so the same wherever it goes.
                    struct.pack_into("<i", snippet, at - start, label.pos - (at + 4))
                else:
                    fixes.append(at - start)        # to the miss exit
            if len(_SNIPPETS) >= _SNIPPET_LIMIT:
                _SNIPPETS.clear()
            _SNIPPETS[ins] = (bytes(snippet), tuple(fixes))
            return False
        return self._emit_insn(i, ins, pc, nxt)

    def _emit_insn(self, i: int, ins: Insn, pc: int, nxt: int | None) -> bool:
        a = self.a
        name, rd, rs1, rs2, imm = ins.name, ins.rd, ins.rs1, ins.rs2, ins.imm
        npc = (pc + ins.length) & M64
        if name in _ALU_I:
            self._get(RAX, rs1)
            a.alu_imm(_ALU_I[name], RAX, imm)
            self._set(rd, RAX)
        elif name in _ALU_R:
            self._get(RAX, rs1)
            self._get(RCX, rs2)
            a.alu(_ALU_R[name], RAX, RCX)
            self._set(rd, RAX)
        elif name in ("slt", "sltu", "slti", "sltiu"):
            self._get(RAX, rs1)
            if name in ("slt", "sltu"):
                self._get(RCX, rs2)
                a.alu(ALU_CMP, RAX, RCX)
            else:
                a.alu_imm(ALU_CMP, RAX, imm)
            a.setcc(CC_L if name in ("slt", "slti") else CC_B, RAX)
            self._set(rd, RAX)
        elif name in _SHIFT:
            word = name.endswith("w")
            self._get(RAX, rs1)
            if name.endswith("i") or name.endswith("iw"):
                a.shift_imm(_SHIFT[name], RAX, imm & (31 if word else 63), w=not word)
            else:
                self._get(RCX, rs2)
                a.shift_cl(_SHIFT[name], RAX, w=not word)
            if word:
                a.movsxd(RAX, RAX)
            self._set(rd, RAX)
        elif name in ("addw", "subw", "addiw"):
            self._get(RAX, rs1)
            if name == "addiw":
                a.alu_imm(ALU_ADD, RAX, imm, w=False)
            else:
                self._get(RCX, rs2)
                a.alu(ALU_ADD if name == "addw" else ALU_SUB, RAX, RCX, w=False)
            a.movsxd(RAX, RAX)
            self._set(rd, RAX)
        elif name in ("mul", "mulw"):
            self._get(RAX, rs1)
            self._get(RCX, rs2)
            a.imul(RAX, RCX, w=name == "mul")
            if name == "mulw":
                a.movsxd(RAX, RAX)
            self._set(rd, RAX)
        elif name in ("mulh", "mulhu"):
            self._get(RAX, rs1)
            self._get(RCX, rs2)
            a.mul_wide(RCX, signed=name == "mulh")
            self._set(rd, RDX)
        elif name == "lui":
            if rd:
                a.mov_imm(RAX, imm)
                self._set(rd, RAX)
        elif name == "auipc":
            if rd:
                self._mov_pc(RAX, pc + imm)
                self._set(rd, RAX)
        elif name == "fence":
            pass
        elif name in _LOADS:
            size, signed = _LOADS[name]
            self._address(i, pc, rs1, imm, size, W_TLB_R)
            a.load_sized(RCX, RAX, size, signed)
            self._set(rd, RCX)
        elif name in _STORES:
            size = _STORES[name]
            self._address(i, pc, rs1, imm, size, W_TLB_W)
            self._get(RCX, rs2)
            a.store_sized(RAX, RCX, size)
        elif name in _DIVS:
            self._divide(rd, rs1, rs2, *_DIVS[name])
        elif name in AMOS:
            alu, size = AMOS[name]
            self._address(i, pc, rs1, 0, size, W_TLB_W, aligned=True)
            word = size == 4
            a.load_sized(RCX, RAX, size, False)              # old value, zero-extended
            self._get(RDX, rs2)
            if alu is not None:
                a.alu(alu, RDX, RCX, w=not word)
            a.store_sized(RAX, RDX, size)
            if word:
                a.movsxd(RCX, RCX)
            self._set(rd, RCX)
        elif name in _CSR_OPS:
            if ins.imm == CSR_TIME:
                self._rdtime(i, pc, ins)
            elif ins.imm == CSR_SSTATUS:
                self._sstatus(i, pc, ins)
            else:
                self._plain_csr(ins)
        elif name in _LRSC:
            self._lrsc(i, pc, ins)
        elif name in _BRANCH_CC:
            target = (pc + imm) & M64
            self._get(RAX, rs1)
            self._get(RCX, rs2)
            a.alu(ALU_CMP, RAX, RCX)
            taken = a.label()
            skip = a.label()
            a.jcc(_BRANCH_CC[name], taken)
            a.jmp(skip)
            a.bind(taken)
            self._goto(i, target)
            a.bind(skip)
            if nxt is None:
                self._goto(i, npc)
                return True
        elif name == "jal":
            target = (pc + imm) & M64
            if rd:
                self._mov_pc(RAX, npc)
                self._set(rd, RAX)
            if nxt == target:
                return False
            self._goto(i, target)
            return True
        elif name == "jalr":
            self._get(RAX, rs1)
            if imm:
                a.alu_imm(ALU_ADD, RAX, imm)
            a.alu_imm(ALU_AND, RAX, -2)
            if rd:
                self._mov_pc(RCX, npc)
                self._set(rd, RCX)
            self._exit(i, None)
            return True
        else:                                  # pragma: no cover - filtered by SUPPORTED
            raise AssertionError(name)
        return False

    def _sstatus(self, i: int, pc: int, ins: Insn) -> None:
        """csrr*/csrr*i on sstatus, as csr.py does it.  In S-mode a write that
        changes SUM switches the read/write TLB tables to the other S context
        (hart.S_SUM) and asks the hart to follow ([W_RESYNC]).  SIE, SPIE, SPP
        and FS change here (the kernel's trap entry and exit write them); writes
        that change MXR (the TLB's rules), and setting SIE while an interrupt is
        pending and enabled, leave for the interpreter before the instruction,
        which then does it all (and takes the interrupt)."""
        a = self.a
        op, immediate = _CSR_OPS[ins.name]
        a.load(RAX, RDI, 8 * W_MSTATUS)                    # old, as stored
        a.mov_imm(RDX, UXL_SXL)
        a.alu(ALU_OR, RDX, RAX)                            # rdx = read value
        no_sd = a.label()
        a.mov32(RCX, RAX)
        a.alu_imm(ALU_AND, RCX, FS, w=False)
        a.alu_imm(ALU_CMP, RCX, FS, w=False)
        a.jcc(CC_NE, no_sd)
        a.mov_imm(RCX, SD)
        a.alu(ALU_OR, RDX, RCX)
        a.bind(no_sd)
        a.mov_imm(RCX, SSTATUS_MASK)
        a.alu(ALU_AND, RDX, RCX)
        if op != 1 and ins.rs1 == 0:                       # csrr: a pure read
            self._set(ins.rd, RDX)
            return
        miss = self._miss(i, pc)
        self._csr_operand(ins, op, immediate)
        a.alu_imm(ALU_AND, R9, _SSTATUS_WRITABLE)
        a.mov(RCX, RAX)
        a.alu_imm(ALU_AND, RCX, ~_SSTATUS_WRITABLE)
        a.alu(ALU_OR, R9, RCX)                             # r9 = new mstatus
        switch = self.priv == 1
        a.mov(RCX, R9)
        a.alu(ALU_XOR, RCX, RAX)
        a.alu_imm(ALU_AND, RCX, ~(_SSTATUS_NATIVE | SUM) if switch else ~_SSTATUS_NATIVE)
        a.jcc(CC_NE, miss)                                 # MXR (or SUM from M) changes
        quiet = a.label()
        a.mov(RCX, RAX)
        a.alu_imm(ALU_XOR, RCX, -1)
        a.alu(ALU_AND, RCX, R9)
        a.alu_imm(ALU_AND, RCX, SIE)
        a.jcc(CC_E, quiet)                                 # SIE not newly set
        a.load(RCX, RDI, 8 * W_MIP)
        a.alu_mem(ALU_AND, RCX, RDI, 8 * W_MIE)
        a.jcc(CC_NE, miss)                                 # an interrupt may be due
        a.bind(quiet)
        if switch:
            same = a.label()
            a.mov(RCX, R9)
            a.alu(ALU_XOR, RCX, RAX)
            a.mov_imm(R8, SUM)
            a.alu(ALU_AND, RCX, R8)
            a.jcc(CC_E, same)                              # SUM unchanged
            on, set_ = a.label(), a.label()
            a.alu(ALU_AND, R8, R9)
            a.jcc(CC_NE, on)
            a.load(RCX, RDI, 8 * W_TLB_S0)
            a.jmp(set_)
            a.bind(on)
            a.load(RCX, RDI, 8 * W_TLB_S1)
            a.bind(set_)
            a.store(RDI, 8 * W_TLB_R, RCX)
            a.alu_imm(ALU_ADD, RCX, TLB_BYTES)
            a.store(RDI, 8 * W_TLB_W, RCX)
            a.store_imm32(RDI, 8 * W_RESYNC, 1)
            a.bind(same)
        a.store(RDI, 8 * W_MSTATUS, R9)
        self._set(ins.rd, RDX)

    def _rdtime(self, i: int, pc: int, ins: Insn) -> None:
        """rd = the clock's ticks, as Clock.ticks computes them: (monotonic ns - [W_CLK_OFF])
        // [W_CLK_DIV], the ns from the C library's clock_gettime (the vDSO's: no system
        call).  Below M-mode mcounteren.TM must be set, in U-mode scounteren.TM too, and
        the divisor non-zero; else the interpreter runs the instruction (and raises the
        illegal-instruction trap).  rdi and r10 are kept across the call; the C call
        gets a 16-byte aligned stack and a timespec on it."""
        a = self.a
        miss = self._miss(i, pc)
        for word in _TM_WORDS[self.priv]:
            a.load(RCX, RDI, 8 * word)
            a.test_imm(RCX, 2)
            a.jcc(CC_E, miss)
        a.load(RCX, RDI, 8 * W_CLK_DIV)
        a.alu_imm(ALU_CMP, RCX, 0)
        a.jcc(CC_E, miss)
        a.load(RAX, RDI, 8 * W_TIME_FN)
        a.buf += (b"\x57"                       # push rdi
                  b"\x41\x52"                   # push r10
                  b"\x55"                       # push rbp
                  b"\x48\x89\xe5"               # mov rbp, rsp
                  b"\x48\x83\xe4\xf0"           # and rsp, -16
                  b"\x48\x83\xec\x10"           # sub rsp, 16: struct timespec
                  b"\xbf" + _PACK_I(CLOCK_MONOTONIC) +    # mov edi, CLOCK_MONOTONIC
                  b"\x48\x89\xe6"               # mov rsi, rsp
                  b"\xff\xd0"                   # call rax
                  b"\x48\x8b\x04\x24"           # mov rax, [rsp]: tv_sec
                  b"\x48\x69\xc0" + _PACK_I(1_000_000_000) +   # imul rax, rax, 10^9
                  b"\x48\x03\x44\x24\x08"       # add rax, [rsp + 8]: tv_nsec
                  b"\x48\x89\xec"               # mov rsp, rbp
                  b"\x5d"                       # pop rbp
                  b"\x41\x5a"                   # pop r10
                  b"\x5f")                      # pop rdi
        a.alu_mem(ALU_SUB, RAX, RDI, 8 * W_CLK_OFF)
        a.load(RCX, RDI, 8 * W_CLK_DIV)
        a.alu(ALU_XOR, RDX, RDX, w=False)
        a.divide(RCX, signed=False)
        self._set(ins.rd, RAX)

    def _csr_operand(self, ins: Insn, op: int, immediate: bool) -> None:
        """r9 = what csrrw/csrrs/csrrc (op 1/2/3) make of the CSR's value in rdx and
        the source (rs1, or the zimm in the rs1 field); r8 holds the source."""
        a = self.a
        if immediate:
            a.mov_imm(R8, ins.rs1)
        else:
            self._get(R8, ins.rs1)
        if op == 1:
            a.mov(R9, R8)
        elif op == 2:
            a.mov(R9, RDX)
            a.alu(ALU_OR, R9, R8)
        else:
            a.mov(R9, R8)
            a.alu_imm(ALU_XOR, R9, -1)
            a.alu(ALU_AND, R9, RDX)

    def _plain_csr(self, ins: Insn) -> None:
        """csrr*/csrr*i on a CSR that is only stored (sscratch, sepc, scause, stval)."""
        a = self.a
        op, immediate = _CSR_OPS[ins.name]
        word, mask = PLAIN_CSRS[ins.imm]
        a.load(RDX, RDI, 8 * word)                          # old value
        if op == 1 or ins.rs1 != 0:
            self._csr_operand(ins, op, immediate)
            if mask != M64:
                a.alu_imm(ALU_AND, R9, mask - (1 << 64) if mask >> 63 else mask)
            a.store(RDI, 8 * word, R9)
        self._set(ins.rd, RDX)

    def _lrsc(self, i: int, pc: int, ins: Insn) -> None:
        """lr/sc on RAM through the native TLB; the reservation is a RAM offset in
        [W_RESV], as Hart.lr/sc keep it."""
        a = self.a
        size = _LRSC[ins.name]
        if ins.name.startswith("lr"):
            self._address(i, pc, ins.rs1, 0, size, W_TLB_R, aligned=True)
            a.load_sized(RCX, RAX, size, size == 4)
            a.alu_mem(ALU_SUB, RAX, RDI, 8 * W_RAM)
            a.store(RDI, 8 * W_RESV, RAX)
            self._set(ins.rd, RCX)
            return
        self._address(i, pc, ins.rs1, 0, size, W_TLB_W, aligned=True)
        fail, done = a.label(), a.label()
        a.mov(RCX, RAX)
        a.alu_mem(ALU_SUB, RCX, RDI, 8 * W_RAM)
        a.alu_mem(ALU_CMP, RCX, RDI, 8 * W_RESV)
        a.store_imm32(RDI, 8 * W_RESV, -1)                 # (mov leaves the flags)
        a.jcc(CC_NE, fail)
        self._get(RDX, ins.rs2)
        a.store_sized(RAX, RDX, size)
        a.alu(ALU_XOR, RCX, RCX, w=False)
        a.jmp(done)
        a.bind(fail)
        a.mov_imm(RCX, 1)
        a.bind(done)
        self._set(ins.rd, RCX)

    def _divide(self, rd: int, rs1: int, rs2: int, signed: bool, rem: bool, wide: bool) -> None:
        """RISC-V division (M chapter 7.2): x / 0 gives all ones (remainder x), the
        signed overflow MIN / -1 gives MIN (remainder 0) -- where x86 would trap."""
        a = self.a
        done, special = a.label(), a.label()
        self._get(RAX, rs1)
        self._get(RCX, rs2)
        a.alu(ALU_OR, RCX, RCX, w=wide)                      # sets ZF for a zero divisor
        a.jcc(CC_E, special)
        if signed:
            a.alu_imm(ALU_CMP, RCX, -1, w=wide)
            ok = a.label()
            a.jcc(CC_NE, ok)
            # divisor -1: quotient = -x (MIN stays MIN), remainder 0; no division needed
            if rem:
                a.alu(ALU_XOR, RAX, RAX, w=False)
            else:
                a.alu(ALU_XOR, RDX, RDX, w=False)
                a.alu(ALU_SUB, RDX, RAX, w=wide)
                a.mov(RAX, RDX)
            a.jmp(done)
            a.bind(ok)
            a.sign_extend_rax(w=wide)
        else:
            a.alu(ALU_XOR, RDX, RDX, w=False)
        a.divide(RCX, signed, w=wide)
        if rem:
            a.mov(RAX, RDX)
        a.jmp(done)
        a.bind(special)                                      # divide by zero
        if not rem:
            a.mov_imm(RAX, M64)
        a.bind(done)
        if not wide:
            a.movsxd(RAX, RAX)
        self._set(rd, RAX)

    def _address(self, i: int, pc: int, rs1: int, imm: int, size: int, table: int,
                 aligned: bool = False) -> None:
        """rax = host address of [rs1 + imm] through the native TLB, or jump to a miss exit."""
        a = self.a
        miss = self._miss(i, pc)
        self._get(RAX, rs1)
        if imm:
            a.alu_imm(ALU_ADD, RAX, imm)
        a.mov(RCX, RAX)
        a.shift_imm(SHR, RCX, 12)
        a.mov32(RDX, RCX)
        a.alu_imm(ALU_AND, RDX, TLB_ENTRIES - 1, w=False)
        a.shift_imm(SHL, RDX, 4, w=False)
        a.alu_mem(ALU_ADD, RDX, RDI, 8 * table)
        hit = a.label()
        a.alu_mem(ALU_CMP, RCX, RDX, 0)              # a global (or M-mode) entry
        a.jcc(CC_E, hit)
        a.alu_mem(ALU_XOR, RCX, RDI, 8 * W_TAG)
        a.alu_mem(ALU_CMP, RCX, RDX, 0)              # the current address space's
        a.jcc(CC_E, hit)
        a.call_mem(RDI, 8 * (W_WALK_R if table == W_TLB_R else W_WALK_W))   # refill (walk_code)
        a.jcc(CC_NE, miss)
        a.bind(hit)
        if aligned:                      # AMOs: misaligned is a fault the slow path raises
            a.mov32(RCX, RAX)
            a.alu_imm(ALU_AND, RCX, size - 1, w=False)
            a.jcc(CC_NE, miss)
        elif size > 1:
            a.mov32(RCX, RAX)
            a.alu_imm(ALU_AND, RCX, 0xFFF, w=False)
            a.alu_imm(ALU_CMP, RCX, 4096 - size, w=False)
            a.jcc(CC_A, miss)
        a.alu_mem(ALU_ADD, RAX, RDX, 8)


_ENTER: Any = None
_ENTER_TYPE = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)


def _enter() -> Any:
    """enter(state, pc, code): rax = pc, jump to code -- how Python enters a block (the
    chain stub enters the same way); made once, in a page of its own."""
    global _ENTER
    if _ENTER is None:
        m = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        m[:5] = b"\x48\x89\xf0\xff\xe2"               # mov rax, rsi; jmp rdx
        _ENTER = (_ENTER_TYPE(ctypes.addressof(ctypes.c_char.from_buffer(m))), m)
    return _ENTER[0]


def native_entry(code: int, n: int, entry_pc: int) -> Callable[[Any], int]:
    """Wrap the native block at `code`, entered at virtual `entry_pc`, as a dispatcher
    entry `run(hart) -> next pc`.  (One block's code serves every pc with its bytes at the same
    page offset: each gets an entry of its own.)

    The dispatcher charges `n`; native code counted what really retired
    (chained blocks and loop iterations included) in [W_RET]."""
    enter = _enter()

    def run(h: Any) -> int:
        pc = enter(h, entry_pc, code)
        x = h.sq
        if x[W_RESYNC]:
            x[W_RESYNC] = 0
            h.set_priv(h.priv)                 # native code switched S's TLB context
        ran = x[W_RET]
        x[W_RET] = 0
        if ran != n:
            h.adj += ran - n
            if h.adj >= LOOP_BUDGET and not pc & 1:
                return h.stop_at(pc)
        if pc & 1:
            return h.native_exit(pc ^ 1)
        if ran < CHAIN_BUDGET:
            h.rechain_hook(h, pc)              # the chain to pc failed (Engine._rechain)
        return pc
    return run


class JumpTables:
    """Per privilege, the native code address of each native block by the physical
    address of its first instruction (any virtual address of the page runs it).

    The tables are anonymous mappings, so only the sets in use take memory; an
    empty entry is all zeros (physical address 0 is never RAM, so it never matches)."""

    def __init__(self) -> None:
        # Private: MADV_DONTNEED then reads back zeros (a shared mapping would keep its data).
        self.maps = {p: mmap.mmap(-1, JMP_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) for p in (0, 1, 3)}
        for m in self.maps.values():
            want_huge_pages(m)      # (chaining looks up random sets: 4 KiB pages miss the host's TLB)
        self.views = {p: memoryview(m).cast("Q") for p, m in self.maps.items()}
        self._addr = {p: ctypes.addressof(ctypes.c_char.from_buffer(m)) for p, m in self.maps.items()}

    def address(self, priv: int) -> int:
        return self._addr[priv]

    @staticmethod
    def set_of(pa: int) -> int:
        """Index in the table's words of the first entry of `pa`'s two-way set."""
        return 8 * (((pa * JMP_HASH) & M64) >> (64 - JMP_SET_BITS))

    def insert(self, priv: int, pa: int, code: int) -> None:
        """Enter a block: over an entry for the same address, else into a free way,
        else over the second way (the first keeps the older, often hotter, block)."""
        v = self.views[priv]
        s = self.set_of(pa)
        if v[s] == pa or v[s] == 0:
            slot = s
        else:
            slot = s + 4
        v[slot], v[slot + 2] = pa, code

    def get(self, priv: int, pa: int) -> int | None:
        """The code entered for `pa`, or None."""
        v = self.views[priv]
        s = self.set_of(pa)
        for slot in (s, s + 4):
            if v[slot] == pa:
                return v[slot + 2]
        return None

    def remove(self, priv: int, pa: int) -> None:
        v = self.views[priv]
        s = self.set_of(pa)
        for slot in (s, s + 4):
            if v[slot] == pa:
                v[slot] = v[slot + 2] = 0

    def clear(self) -> None:
        for m in self.maps.values():
            m.madvise(mmap.MADV_DONTNEED)       # back to zero pages

