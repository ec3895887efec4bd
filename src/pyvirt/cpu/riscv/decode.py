"""RV64GC instruction decoder.

`decode(word)` turns an instruction (16-bit compressed or 32-bit) into an
`Insn`: the *canonical* instruction name plus its operand fields.  Compressed
instructions decode to the 32-bit instruction they expand to (unprivileged
ISA, chapter "C", table of RVC expansions) with `length` 2, so the execution
templates exist once per operation.

Unknown or reserved encodings decode to the name "illegal".  Decoding is pure
and cached by instruction word.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple


class Insn(NamedTuple):
    name: str
    rd: int = 0
    rs1: int = 0
    rs2: int = 0
    rs3: int = 0
    imm: int = 0      # signed immediate; CSR number for Zicsr; zimm in rs1 for csr*i
    rm: int = 0       # FP rounding mode field; aq/rl bits for AMOs
    length: int = 4
    raw: int = 0


ILLEGAL = "illegal"


def _sext(value: int, bits: int) -> int:
    sign = 1 << (bits - 1)
    return (value & (sign - 1)) - (value & sign)


def _illegal(word: int, length: int) -> Insn:
    return Insn(ILLEGAL, length=length, raw=word)


# ----------------------------------------------------------------------------
# 32-bit encodings
# ----------------------------------------------------------------------------
_BRANCH = {0: "beq", 1: "bne", 4: "blt", 5: "bge", 6: "bltu", 7: "bgeu"}
_LOAD = {0: "lb", 1: "lh", 2: "lw", 3: "ld", 4: "lbu", 5: "lhu", 6: "lwu"}
_STORE = {0: "sb", 1: "sh", 2: "sw", 3: "sd"}
_OPIMM = {0: "addi", 2: "slti", 3: "sltiu", 4: "xori", 6: "ori", 7: "andi"}
_OP = {
    (0, 0): "add", (0x20, 0): "sub", (0, 1): "sll", (0, 2): "slt", (0, 3): "sltu",
    (0, 4): "xor", (0, 5): "srl", (0x20, 5): "sra", (0, 6): "or", (0, 7): "and",
    (1, 0): "mul", (1, 1): "mulh", (1, 2): "mulhsu", (1, 3): "mulhu",
    (1, 4): "div", (1, 5): "divu", (1, 6): "rem", (1, 7): "remu",
}
_OP32 = {
    (0, 0): "addw", (0x20, 0): "subw", (0, 1): "sllw", (0, 5): "srlw", (0x20, 5): "sraw",
    (1, 0): "mulw", (1, 4): "divw", (1, 5): "divuw", (1, 6): "remw", (1, 7): "remuw",
}
_AMO = {
    0x00: "amoadd", 0x01: "amoswap", 0x02: "lr", 0x03: "sc", 0x04: "amoxor",
    0x08: "amoor", 0x0C: "amoand", 0x10: "amomin", 0x14: "amomax",
    0x18: "amominu", 0x1C: "amomaxu",
}
_CSR = {1: "csrrw", 2: "csrrs", 3: "csrrc", 5: "csrrwi", 6: "csrrsi", 7: "csrrci"}
_FMA = {0x43: "fmadd", 0x47: "fmsub", 0x4B: "fnmsub", 0x4F: "fnmadd"}
_SYSTEM_EXACT = {
    0x00000073: "ecall", 0x00100073: "ebreak", 0x10200073: "sret",
    0x30200073: "mret", 0x10500073: "wfi",
}


def _decode_fp(word: int, rd: int, f3: int, rs1: int, rs2: int) -> Insn:
    f7 = word >> 25
    fmt = f7 & 3
    if fmt > 1:
        return _illegal(word, 4)
    sfx = "_s" if fmt == 0 else "_d"
    op = f7 >> 2
    name = None
    if op in (0x00, 0x01, 0x02, 0x03):
        name = ("fadd", "fsub", "fmul", "fdiv")[op] + sfx
    elif op == 0x0B and rs2 == 0:
        name = "fsqrt" + sfx
    elif op == 0x04 and f3 <= 2:
        name = ("fsgnj", "fsgnjn", "fsgnjx")[f3] + sfx
        return Insn(name, rd, rs1, rs2, raw=word)
    elif op == 0x05 and f3 <= 1:
        return Insn(("fmin", "fmax")[f3] + sfx, rd, rs1, rs2, raw=word)
    elif op == 0x08:
        if fmt == 0 and rs2 == 1:
            name = "fcvt_s_d"
        elif fmt == 1 and rs2 == 0:
            name = "fcvt_d_s"
    elif op == 0x14 and f3 <= 2:
        return Insn(("fle", "flt", "feq")[f3] + sfx, rd, rs1, rs2, raw=word)
    elif op == 0x18 and rs2 <= 3:
        name = "fcvt_" + ("w", "wu", "l", "lu")[rs2] + sfx
    elif op == 0x1A and rs2 <= 3:
        name = "fcvt" + sfx + "_" + ("w", "wu", "l", "lu")[rs2]
    elif op == 0x1C and rs2 == 0 and f3 == 0:
        return Insn("fmv_x_w" if fmt == 0 else "fmv_x_d", rd, rs1, raw=word)
    elif op == 0x1C and rs2 == 0 and f3 == 1:
        return Insn("fclass" + sfx, rd, rs1, raw=word)
    elif op == 0x1E and rs2 == 0 and f3 == 0:
        return Insn("fmv_w_x" if fmt == 0 else "fmv_d_x", rd, rs1, raw=word)
    if name is None:
        return _illegal(word, 4)
    return Insn(name, rd, rs1, rs2, rm=f3, raw=word)


def _decode32(word: int) -> Insn:
    opcode = word & 0x7F
    rd = (word >> 7) & 31
    f3 = (word >> 12) & 7
    rs1 = (word >> 15) & 31
    rs2 = (word >> 20) & 31
    f7 = word >> 25
    imm_i = _sext(word >> 20, 12)
    if opcode == 0x37:
        return Insn("lui", rd, imm=_sext(word & 0xFFFFF000, 32), raw=word)
    if opcode == 0x17:
        return Insn("auipc", rd, imm=_sext(word & 0xFFFFF000, 32), raw=word)
    if opcode == 0x6F:
        imm = (((word >> 31) & 1) << 20) | (((word >> 21) & 0x3FF) << 1) \
            | (((word >> 20) & 1) << 11) | (((word >> 12) & 0xFF) << 12)
        return Insn("jal", rd, imm=_sext(imm, 21), raw=word)
    if opcode == 0x67 and f3 == 0:
        return Insn("jalr", rd, rs1, imm=imm_i, raw=word)
    if opcode == 0x63 and f3 in _BRANCH:
        imm = (((word >> 31) & 1) << 12) | (((word >> 25) & 0x3F) << 5) \
            | (((word >> 8) & 0xF) << 1) | (((word >> 7) & 1) << 11)
        return Insn(_BRANCH[f3], 0, rs1, rs2, imm=_sext(imm, 13), raw=word)
    if opcode == 0x03 and f3 in _LOAD:
        return Insn(_LOAD[f3], rd, rs1, imm=imm_i, raw=word)
    if opcode == 0x23 and f3 in _STORE:
        imm = ((word >> 25) << 5) | ((word >> 7) & 31)
        return Insn(_STORE[f3], 0, rs1, rs2, imm=_sext(imm, 12), raw=word)
    if opcode == 0x13:
        if f3 in _OPIMM:
            return Insn(_OPIMM[f3], rd, rs1, imm=imm_i, raw=word)
        shamt = (word >> 20) & 63
        f6 = word >> 26
        if f3 == 1 and f6 == 0:
            return Insn("slli", rd, rs1, imm=shamt, raw=word)
        if f3 == 5 and f6 == 0:
            return Insn("srli", rd, rs1, imm=shamt, raw=word)
        if f3 == 5 and f6 == 0x10:
            return Insn("srai", rd, rs1, imm=shamt, raw=word)
        return _illegal(word, 4)
    if opcode == 0x1B:
        if f3 == 0:
            return Insn("addiw", rd, rs1, imm=imm_i, raw=word)
        shamt = (word >> 20) & 31
        if f3 == 1 and f7 == 0:
            return Insn("slliw", rd, rs1, imm=shamt, raw=word)
        if f3 == 5 and f7 == 0:
            return Insn("srliw", rd, rs1, imm=shamt, raw=word)
        if f3 == 5 and f7 == 0x20:
            return Insn("sraiw", rd, rs1, imm=shamt, raw=word)
        return _illegal(word, 4)
    if opcode == 0x33:
        name = _OP.get((f7, f3))
        return Insn(name, rd, rs1, rs2, raw=word) if name else _illegal(word, 4)
    if opcode == 0x3B:
        name = _OP32.get((f7, f3))
        return Insn(name, rd, rs1, rs2, raw=word) if name else _illegal(word, 4)
    if opcode == 0x0F:
        if f3 == 0:
            # Zihintpause: `pause` is the fence with pred = W, succ = 0.
            return Insn("pause" if word == 0x0100000F else "fence", raw=word)
        if f3 == 1:
            return Insn("fence_i", raw=word)
        return _illegal(word, 4)
    if opcode == 0x73:
        if f3 == 0:
            name = _SYSTEM_EXACT.get(word)
            if name:
                return Insn(name, raw=word)
            if f7 == 0x09 and rd == 0:
                return Insn("sfence_vma", 0, rs1, rs2, raw=word)
            return _illegal(word, 4)
        if f3 in _CSR:
            return Insn(_CSR[f3], rd, rs1, imm=(word >> 20) & 0xFFF, raw=word)
        return _illegal(word, 4)
    if opcode == 0x2F and f3 in (2, 3):
        name = _AMO.get(f7 >> 2)
        if name is None or (name == "lr" and rs2 != 0):
            return _illegal(word, 4)
        return Insn(name + ("_w" if f3 == 2 else "_d"), rd, rs1, rs2, rm=f7 & 3, raw=word)
    if opcode == 0x07 and f3 in (2, 3):
        return Insn("flw" if f3 == 2 else "fld", rd, rs1, imm=imm_i, raw=word)
    if opcode == 0x27 and f3 in (2, 3):
        imm = ((word >> 25) << 5) | ((word >> 7) & 31)
        return Insn("fsw" if f3 == 2 else "fsd", 0, rs1, rs2, imm=_sext(imm, 12), raw=word)
    if opcode in _FMA:
        fmt = (word >> 25) & 3
        if fmt > 1:
            return _illegal(word, 4)
        name = _FMA[opcode] + ("_s" if fmt == 0 else "_d")
        return Insn(name, rd, rs1, rs2, rs3=word >> 27, rm=f3, raw=word)
    if opcode == 0x53:
        return _decode_fp(word, rd, f3, rs1, rs2)
    return _illegal(word, 4)


# ----------------------------------------------------------------------------
# 16-bit (RVC) encodings, RV64 variant
# ----------------------------------------------------------------------------
def _bits(v: int, hi: int, lo: int) -> int:
    return (v >> lo) & ((1 << (hi - lo + 1)) - 1)


def _decode16(h: int) -> Insn:
    op = h & 3
    f3 = h >> 13
    rdp = _bits(h, 4, 2) + 8        # rd' / rs2'
    rs1p = _bits(h, 9, 7) + 8       # rs1' / rd'
    rd = _bits(h, 11, 7)
    rs2 = _bits(h, 6, 2)

    def c(name: str, rd: int = 0, rs1: int = 0, rs2: int = 0, imm: int = 0) -> Insn:
        return Insn(name, rd, rs1, rs2, imm=imm, length=2, raw=h)

    if op == 0:
        if f3 == 0:  # c.addi4spn
            imm = (_bits(h, 12, 11) << 4) | (_bits(h, 10, 7) << 6) | (_bits(h, 6, 6) << 2) \
                | (_bits(h, 5, 5) << 3)
            return c("addi", rdp, 2, imm=imm) if imm else _illegal(h, 2)
        off_w = (_bits(h, 12, 10) << 3) | (_bits(h, 6, 6) << 2) | (_bits(h, 5, 5) << 6)
        off_d = (_bits(h, 12, 10) << 3) | (_bits(h, 6, 5) << 6)
        if f3 == 1:
            return c("fld", rdp, rs1p, imm=off_d)
        if f3 == 2:
            return c("lw", rdp, rs1p, imm=off_w)
        if f3 == 3:
            return c("ld", rdp, rs1p, imm=off_d)
        if f3 == 5:
            return c("fsd", 0, rs1p, rdp, imm=off_d)
        if f3 == 6:
            return c("sw", 0, rs1p, rdp, imm=off_w)
        if f3 == 7:
            return c("sd", 0, rs1p, rdp, imm=off_d)
        return _illegal(h, 2)
    if op == 1:
        imm6 = _sext((_bits(h, 12, 12) << 5) | _bits(h, 6, 2), 6)
        if f3 == 0:
            return c("addi", rd, rd, imm=imm6)          # c.addi / c.nop
        if f3 == 1:
            return c("addiw", rd, rd, imm=imm6) if rd else _illegal(h, 2)
        if f3 == 2:
            return c("addi", rd, 0, imm=imm6)           # c.li
        if f3 == 3:
            if rd == 2:  # c.addi16sp
                imm = (_bits(h, 12, 12) << 9) | (_bits(h, 6, 6) << 4) | (_bits(h, 5, 5) << 6) \
                    | (_bits(h, 4, 3) << 7) | (_bits(h, 2, 2) << 5)
                imm = _sext(imm, 10)
                return c("addi", 2, 2, imm=imm) if imm else _illegal(h, 2)
            imm = _sext((_bits(h, 12, 12) << 17) | (_bits(h, 6, 2) << 12), 18)
            return c("lui", rd, imm=imm) if imm else _illegal(h, 2)
        if f3 == 4:
            f2 = _bits(h, 11, 10)
            shamt = (_bits(h, 12, 12) << 5) | _bits(h, 6, 2)
            if f2 == 0:
                return c("srli", rs1p, rs1p, imm=shamt)
            if f2 == 1:
                return c("srai", rs1p, rs1p, imm=shamt)
            if f2 == 2:
                return c("andi", rs1p, rs1p, imm=imm6)
            sub = (_bits(h, 12, 12) << 2) | _bits(h, 6, 5)
            name = ("sub", "xor", "or", "and", "subw", "addw", None, None)[sub]
            return c(name, rs1p, rs1p, rdp) if name else _illegal(h, 2)
        if f3 == 5:  # c.j
            imm = (_bits(h, 12, 12) << 11) | (_bits(h, 11, 11) << 4) | (_bits(h, 10, 9) << 8) \
                | (_bits(h, 8, 8) << 10) | (_bits(h, 7, 7) << 6) | (_bits(h, 6, 6) << 7) \
                | (_bits(h, 5, 3) << 1) | (_bits(h, 2, 2) << 5)
            return c("jal", 0, imm=_sext(imm, 12))
        imm = (_bits(h, 12, 12) << 8) | (_bits(h, 11, 10) << 3) | (_bits(h, 6, 5) << 6) \
            | (_bits(h, 4, 3) << 1) | (_bits(h, 2, 2) << 5)
        return c("beq" if f3 == 6 else "bne", 0, rs1p, 0, imm=_sext(imm, 9))
    if op == 2:
        if f3 == 0:
            shamt = (_bits(h, 12, 12) << 5) | _bits(h, 6, 2)
            return c("slli", rd, rd, imm=shamt)
        if f3 in (1, 3):  # c.fldsp / c.ldsp
            imm = (_bits(h, 12, 12) << 5) | (_bits(h, 6, 5) << 3) | (_bits(h, 4, 2) << 6)
            if f3 == 3 and rd == 0:
                return _illegal(h, 2)
            return c("fld" if f3 == 1 else "ld", rd, 2, imm=imm)
        if f3 == 2:  # c.lwsp
            imm = (_bits(h, 12, 12) << 5) | (_bits(h, 6, 4) << 2) | (_bits(h, 3, 2) << 6)
            return c("lw", rd, 2, imm=imm) if rd else _illegal(h, 2)
        if f3 == 4:
            if _bits(h, 12, 12) == 0:
                if rs2 == 0:
                    return c("jalr", 0, rd, imm=0) if rd else _illegal(h, 2)   # c.jr
                return c("add", rd, 0, rs2)                                   # c.mv
            if rs2 == 0:
                if rd == 0:
                    return c("ebreak")
                return c("jalr", 1, rd, imm=0)                                # c.jalr
            return c("add", rd, rd, rs2)
        if f3 in (5, 7):  # c.fsdsp / c.sdsp
            imm = (_bits(h, 12, 10) << 3) | (_bits(h, 9, 7) << 6)
            return c("fsd" if f3 == 5 else "sd", 0, 2, rs2, imm=imm)
        if f3 == 6:  # c.swsp
            imm = (_bits(h, 12, 9) << 2) | (_bits(h, 8, 7) << 6)
            return c("sw", 0, 2, rs2, imm=imm)
    return _illegal(h, 2)


@lru_cache(maxsize=65536)
def decode(word: int) -> Insn:
    """Decode the instruction whose low bits are in `word` (16 or 32 bits)."""
    if word & 3 != 3:
        return _decode16(word & 0xFFFF)
    if word & 0x1C == 0x1C:  # 48-bit and longer encodings: not supported
        return _illegal(word & 0xFFFF, 2)
    return _decode32(word & 0xFFFFFFFF)


def insn_length(low_half: int) -> int:
    return 4 if low_half & 3 == 3 else 2
