"""A tiny x86-64 assembler: the instruction forms the native tier emits.

Only 64-bit general registers, `[base + disp]` memory operands and rel32
jumps to labels.  Encodings follow the Intel SDM volume 2 (REX prefixes,
ModRM with mod=01/10, SIB for rsp/r12 bases).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., None])
_MEMO_LIMIT = 1 << 16

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R8, R9, R10, R11, R12, R13, R14, R15 = range(8, 16)

# Condition codes for jcc/setcc.
CC_B, CC_AE, CC_E, CC_NE, CC_BE, CC_A = 2, 3, 4, 5, 6, 7
CC_L, CC_GE, CC_LE, CC_G = 12, 13, 14, 15

ALU_ADD, ALU_OR, ALU_AND, ALU_SUB, ALU_XOR, ALU_CMP = 0, 1, 4, 5, 6, 7
_ALU_RM = {ALU_ADD: 0x03, ALU_OR: 0x0B, ALU_AND: 0x23, ALU_SUB: 0x2B, ALU_XOR: 0x33, ALU_CMP: 0x3B}
SHL, SHR, SAR = 4, 5, 7


def _memo(fn: F) -> F:
    """Cache the bytes an instruction form encodes to, by its arguments: the
    translator emits the same few hundred forms over and over, and encoding
    them in Python was most of a block's translation time."""
    cache: dict[Any, bytes] = {}

    def emit(self: Asm, *args: Any, **kw: Any) -> None:
        key = (args, tuple(kw.items())) if kw else args
        code = cache.get(key)
        if code is None:
            buf = self.buf
            start = len(buf)
            fn(self, *args, **kw)
            if len(cache) >= _MEMO_LIMIT:
                cache.clear()
            cache[key] = bytes(buf[start:])
        else:
            self.buf += code
    emit.__doc__ = fn.__doc__
    emit.__name__ = fn.__name__
    return emit  # type: ignore[return-value]


class Label:
    __slots__ = ("pos",)

    def __init__(self) -> None:
        self.pos: int | None = None


class Asm:
    def __init__(self) -> None:
        self.buf = bytearray()
        self._fixups: list[tuple[int, Label]] = []
        self.far: list[int] = []

    # -- encoding helpers ---------------------------------------------------------
    def _rex(self, w: bool, reg: int, base: int, force: bool = False) -> None:
        rex = 0x40 | (8 if w else 0) | ((reg >> 3) << 2) | (base >> 3)
        if rex != 0x40 or force:
            self.buf.append(rex)

    def _modrm_mem(self, reg: int, base: int, disp: int) -> None:
        reg &= 7
        b = base & 7
        if -128 <= disp < 128:
            self.buf.append(0x40 | (reg << 3) | b)
            if b == 4:
                self.buf.append(0x24)
            self.buf += struct.pack("<b", disp)
        else:
            self.buf.append(0x80 | (reg << 3) | b)
            if b == 4:
                self.buf.append(0x24)
            self.buf += struct.pack("<i", disp)

    def _modrm_reg(self, reg: int, rm: int) -> None:
        self.buf.append(0xC0 | ((reg & 7) << 3) | (rm & 7))

    def _op_mem(self, opcode: bytes, reg: int, base: int, disp: int, w: bool = True,
                force_rex: bool = False, prefix: bytes = b"") -> None:
        self.buf += prefix
        self._rex(w, reg, base, force_rex)
        self.buf += opcode
        self._modrm_mem(reg, base, disp)

    def _op_reg(self, opcode: bytes, reg: int, rm: int, w: bool = True) -> None:
        self._rex(w, reg, rm)
        self.buf += opcode
        self._modrm_reg(reg, rm)

    # -- moves ---------------------------------------------------------------------------
    @_memo
    def load(self, dst: int, base: int, disp: int) -> None:          # mov dst, [base+disp]
        self._op_mem(b"\x8b", dst, base, disp)

    @_memo
    def store(self, base: int, disp: int, src: int) -> None:         # mov [base+disp], src
        self._op_mem(b"\x89", src, base, disp)

    @_memo
    def mov(self, dst: int, src: int) -> None:
        self._op_reg(b"\x89", src, dst)

    @_memo
    def mov_imm(self, dst: int, value: int) -> None:
        value &= (1 << 64) - 1
        if value < 1 << 32:
            self._rex(False, 0, dst)
            self.buf.append(0xB8 | (dst & 7))
            self.buf += struct.pack("<I", value)
        elif value >= (1 << 64) - (1 << 31):
            self._rex(True, 0, dst)
            self.buf += b"\xc7"
            self._modrm_reg(0, dst)
            self.buf += struct.pack("<i", value - (1 << 64))
        else:
            self._rex(True, 0, dst)
            self.buf.append(0xB8 | (dst & 7))
            self.buf += struct.pack("<Q", value)

    @_memo
    def store_imm32(self, base: int, disp: int, value: int) -> None:  # mov qword [m], simm32
        self._op_mem(b"\xc7", 0, base, disp)
        self.buf += struct.pack("<i", value)

    @_memo
    def add_mem_imm(self, base: int, disp: int, value: int) -> None:  # add qword [m], simm32
        self._op_mem(b"\x81", 0, base, disp)
        self.buf += struct.pack("<i", value)

    # -- arithmetic ---------------------------------------------------------------------------
    @_memo
    def alu(self, op: int, dst: int, src: int, w: bool = True) -> None:
        self._op_reg(bytes([_ALU_RM[op]]), dst, src, w)   # op dst, src  (reg form via r/m = src)

    @_memo
    def alu_mem(self, op: int, dst: int, base: int, disp: int) -> None:
        self._op_mem(bytes([_ALU_RM[op]]), dst, base, disp)

    @_memo
    def alu_imm(self, op: int, dst: int, value: int, w: bool = True) -> None:
        if -128 <= value < 128:
            self._rex(w, 0, dst)
            self.buf += b"\x83"
            self._modrm_reg(op, dst)
            self.buf += struct.pack("<b", value)
        else:
            self._rex(w, 0, dst)
            self.buf += b"\x81"
            self._modrm_reg(op, dst)
            self.buf += struct.pack("<i", value)

    @_memo
    def shift_imm(self, kind: int, dst: int, count: int, w: bool = True) -> None:
        self._rex(w, 0, dst)
        self.buf += b"\xc1"
        self._modrm_reg(kind, dst)
        self.buf.append(count)

    @_memo
    def shift_cl(self, kind: int, dst: int, w: bool = True) -> None:
        self._rex(w, 0, dst)
        self.buf += b"\xd3"
        self._modrm_reg(kind, dst)

    @_memo
    def imul(self, dst: int, src: int, w: bool = True) -> None:
        self._rex(w, dst, src)
        self.buf += b"\x0f\xaf"
        self._modrm_reg(dst, src)

    @_memo
    def mul_wide(self, src: int, signed: bool) -> None:       # rdx:rax = rax * src
        self._rex(True, 0, src)
        self.buf += b"\xf7"
        self._modrm_reg(5 if signed else 4, src)

    @_memo
    def divide(self, src: int, signed: bool, w: bool = True) -> None:
        """rdx:rax / src (edx:eax for 32-bit): quotient in rax, remainder in rdx."""
        self._rex(w, 0, src)
        self.buf += b"\xf7"
        self._modrm_reg(7 if signed else 6, src)

    @_memo
    def sign_extend_rax(self, w: bool = True) -> None:         # cqo / cdq
        if w:
            self.buf.append(0x48)
        self.buf.append(0x99)

    @_memo
    def movsxd(self, dst: int, src: int) -> None:              # sign-extend 32 -> 64
        self._rex(True, dst, src)
        self.buf += b"\x63"
        self._modrm_reg(dst, src)

    @_memo
    def mov32(self, dst: int, src: int) -> None:               # zero-extend 32 -> 64
        self._op_reg(b"\x89", src, dst, w=False)

    @_memo
    def lea(self, dst: int, base: int, disp: int) -> None:
        self._op_mem(b"\x8d", dst, base, disp)

    @_memo
    def setcc(self, cc: int, dst: int) -> None:                # dst = cc ? 1 : 0 (full width)
        self._rex(False, 0, dst, force=True)
        self.buf += bytes((0x0F, 0x90 | cc))
        self._modrm_reg(0, dst)
        self._rex(False, dst, dst, force=True)
        self.buf += b"\x0f\xb6"                                  # movzx dst32, dst8
        self._modrm_reg(dst, dst)

    # -- memory access of guest data (host address in a register) --------------------------
    @_memo
    def load_sized(self, dst: int, base: int, size: int, signed: bool) -> None:
        if size == 8:
            self._op_mem(b"\x8b", dst, base, 0)
        elif size == 4:
            if signed:
                self._op_mem(b"\x63", dst, base, 0)
            else:
                self._op_mem(b"\x8b", dst, base, 0, w=False)
        elif size == 2:
            self._op_mem(b"\x0f\xbf" if signed else b"\x0f\xb7", dst, base, 0, w=signed)
        else:
            self._op_mem(b"\x0f\xbe" if signed else b"\x0f\xb6", dst, base, 0, w=signed)

    @_memo
    def store_sized(self, base: int, src: int, size: int) -> None:
        if size == 8:
            self._op_mem(b"\x89", src, base, 0)
        elif size == 4:
            self._op_mem(b"\x89", src, base, 0, w=False)
        elif size == 2:
            self._op_mem(b"\x89", src, base, 0, w=False, prefix=b"\x66")
        else:
            self._op_mem(b"\x88", src, base, 0, w=False, force_rex=True)

    # -- control flow ------------------------------------------------------------------------------
    def label(self) -> Label:
        return Label()

    def bind(self, label: Label) -> None:
        label.pos = len(self.buf)

    def jcc(self, cc: int, label: Label) -> None:
        self.buf += bytes((0x0F, 0x80 | cc))
        self._fixups.append((len(self.buf), label))
        self.buf += b"\0\0\0\0"

    def jmp(self, label: Label) -> None:
        self.buf.append(0xE9)
        self._fixups.append((len(self.buf), label))
        self.buf += b"\0\0\0\0"

    def jmp_far(self, flag: int = 0) -> None:
        """jmp rel32 to an address outside this code, patched where it is placed
        (its offsets are in `far`, each or'ed with `flag`: the caller's mark)."""
        self.buf.append(0xE9)
        self.far.append(len(self.buf) | flag)
        self.buf += b"\0\0\0\0"

    @_memo
    def jmp_mem(self, base: int, disp: int) -> None:          # jmp qword [base+disp]
        self._op_mem(b"\xff", 4, base, disp, w=False)

    @_memo
    def call_mem(self, base: int, disp: int) -> None:         # call qword [base+disp]
        self._op_mem(b"\xff", 2, base, disp, w=False)

    @_memo
    def cmp_mem_imm(self, base: int, disp: int, value: int) -> None:   # cmp qword [m], simm8
        self._op_mem(b"\x83", 7, base, disp)
        self.buf += struct.pack("<b", value)

    @_memo
    def test_imm(self, dst: int, value: int) -> None:          # test dst32, imm32
        self._rex(False, 0, dst)
        self.buf += b"\xf7"
        self._modrm_reg(0, dst)
        self.buf += struct.pack("<I", value)

    @_memo
    def lock_cmpxchg(self, base: int, src: int) -> None:       # lock cmpxchg [base], src (vs rax)
        self.buf.append(0xF0)
        self._op_mem(b"\x0f\xb1", src, base, 0)

    @_memo
    def lock_or_byte(self, base: int, value: int) -> None:     # lock or byte [base], imm8
        self.buf.append(0xF0)
        self._op_mem(b"\x80", 1, base, 0, w=False)
        self.buf.append(value)

    def ret(self) -> None:
        self.buf.append(0xC3)

    def finish(self) -> bytes:
        for at, label in self._fixups:
            if label.pos is None:
                raise ValueError("unbound label")
            struct.pack_into("<i", self.buf, at, label.pos - (at + 4))
        return bytes(self.buf)
