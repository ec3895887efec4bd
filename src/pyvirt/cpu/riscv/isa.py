"""RV64GC instruction semantics, written once as templates.

Each template is a function of an emitter `e` (see emit.py) registered under
the canonical instruction name the decoder produces.  Registers hold 64-bit
values as unsigned Python ints; `M` masks to 64 bits and signed comparisons
flip the sign bit.  Complex operations (division, CSRs, AMOs, privileged
instructions, floating point) call helpers that both tiers share.

Unprivileged ISA 20191213 chapters 2 (RV32I), 5 (RV64I), 7 (M), 8 (A), 11-12
(F, D), 16 (C); privileged ISA 1.12 for the system instructions.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvirt.cpu.riscv.emit import M64, SIGN64, Emitter, add64, signed, sx32

Template = Callable[[Emitter], None]
TEMPLATES: dict[str, Template] = {}

M = 0xFFFF_FFFF_FFFF_FFFF
S = 1 << 63


def template(*names: str) -> Callable[[Template], Template]:
    def deco(fn: Template) -> Template:
        for n in names:
            TEMPLATES[n] = fn
        return fn
    return deco


def _def(name: str, build: Template) -> None:
    TEMPLATES[name] = build


# ---------------------------------------------------------------------------
# Division helpers (chapter 7.2: division by zero and overflow are defined)
# ---------------------------------------------------------------------------
def div64(a: int, b: int) -> int:
    if b == 0:
        return M
    sa, sb = (a ^ S) - S, (b ^ S) - S
    if sa == -S and sb == -1:
        return a
    q = abs(sa) // abs(sb)
    return (-q if (sa < 0) != (sb < 0) else q) & M


def divu64(a: int, b: int) -> int:
    return a // b if b else M


def rem64(a: int, b: int) -> int:
    if b == 0:
        return a
    sa, sb = (a ^ S) - S, (b ^ S) - S
    if sa == -S and sb == -1:
        return 0
    r = abs(sa) % abs(sb)
    return (-r if sa < 0 else r) & M


def remu64(a: int, b: int) -> int:
    return a % b if b else a


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def divw(a: int, b: int) -> int:
    sa, sb = _s32(a), _s32(b)
    if sb == 0:
        return M
    if sa == -(1 << 31) and sb == -1:
        return sa & M
    q = abs(sa) // abs(sb)
    return (-q if (sa < 0) != (sb < 0) else q) & M


def divuw(a: int, b: int) -> int:
    ua, ub = a & 0xFFFFFFFF, b & 0xFFFFFFFF
    if ub == 0:
        return M
    return _s32(ua // ub) & M


def remw(a: int, b: int) -> int:
    sa, sb = _s32(a), _s32(b)
    if sb == 0:
        return sa & M
    if sa == -(1 << 31) and sb == -1:
        return 0
    r = abs(sa) % abs(sb)
    return (-r if sa < 0 else r) & M


def remuw(a: int, b: int) -> int:
    ua, ub = a & 0xFFFFFFFF, b & 0xFFFFFFFF
    if ub == 0:
        return _s32(ua) & M
    return _s32(ua % ub) & M


HELPERS = {
    "div64": div64, "divu64": divu64, "rem64": rem64, "remu64": remu64,
    "divw": divw, "divuw": divuw, "remw": remw, "remuw": remuw,
}

# ---------------------------------------------------------------------------
# RV64I: integer computational instructions
# ---------------------------------------------------------------------------
_R_OPS = {
    "add": "({a} + {b}) & M64",
    "sub": "({a} - {b}) & M64",
    "sll": "({a} << ({b} & 63)) & M64",
    "slt": "1 if ({a} ^ S64) < ({b} ^ S64) else 0",
    "sltu": "1 if {a} < {b} else 0",
    "xor": "{a} ^ {b}",
    "srl": "{a} >> ({b} & 63)",
    "sra": "(SA >> ({b} & 63)) & M64",
    "or": "{a} | {b}",
    "and": "{a} & {b}",
    "mul": "({a} * {b}) & M64",
    "mulh": "((SA * SB) >> 64) & M64",
    "mulhsu": "((SA * {b}) >> 64) & M64",
    "mulhu": "({a} * {b}) >> 64",
    "div": "div64({a}, {b})",
    "divu": "divu64({a}, {b})",
    "rem": "rem64({a}, {b})",
    "remu": "remu64({a}, {b})",
    "addw": "SX({a} + {b})",
    "subw": "SX({a} - {b})",
    "sllw": "SX({a} << ({b} & 31))",
    "srlw": "SX(({a} & 0xFFFFFFFF) >> ({b} & 31))",
    "sraw": "(SW >> ({b} & 31)) & M64",
    "mulw": "SX({a} * {b})",
    "divw": "divw({a}, {b})",
    "divuw": "divuw({a}, {b})",
    "remw": "remw({a}, {b})",
    "remuw": "remuw({a}, {b})",
}


def _expand(pattern: str, a: str, b: str) -> str:
    if pattern == _R_OPS["add"]:
        return add64(a, b)
    if pattern == _R_OPS["addw"] and b == "0":
        return sx32(a)
    out = pattern.replace("SA", f"({signed(a)})").replace("SB", f"({signed(b)})")
    out = out.replace("SW", f"((({a} & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000)")
    out = out.replace("M64", M64).replace("S64", SIGN64)
    if out.startswith("SX("):
        out = sx32(out[3:-1])
    return out.format(a=a, b=b)


def _r_type(pattern: str) -> Template:
    def build(e: Emitter) -> None:
        e.rd_set(_expand(pattern, e.rs1, e.rs2))
    return build


for _name, _pat in _R_OPS.items():
    _def(_name, _r_type(_pat))

_I_OPS = {
    "addi": ("add", "imm"), "slti": ("slt", "uimm"), "sltiu": ("sltu", "uimm"),
    "xori": ("xor", "uimm"), "ori": ("or", "uimm"), "andi": ("and", "uimm"),
    "slli": ("sll", "imm"), "srli": ("srl", "imm"), "srai": ("sra", "imm"),
    "addiw": ("addw", "imm"), "slliw": ("sllw", "imm"), "srliw": ("srlw", "imm"),
    "sraiw": ("sraw", "imm"),
}


def _i_type(op: str, which: str) -> Template:
    pattern = _R_OPS[op]

    def build(e: Emitter) -> None:
        e.rd_set(_expand(pattern, e.rs1, getattr(e, which)))
    return build


for _name, (_op, _which) in _I_OPS.items():
    _def(_name, _i_type(_op, _which))


@template("lui")
def _lui(e: Emitter) -> None:
    e.rd_set(e.uimm)


@template("auipc")
def _auipc(e: Emitter) -> None:
    e.rd_set(f"({e.pc} + {e.imm}) & {M64}")


# ---------------------------------------------------------------------------
# Control transfer
# ---------------------------------------------------------------------------
@template("jal")
def _jal(e: Emitter) -> None:
    e.rd_set(e.npc)
    e.jump(f"({e.pc} + {e.imm}) & {M64}", direct=True)


@template("jalr")
def _jalr(e: Emitter) -> None:
    t = e.tmp()
    e.line(f"{t} = ({e.rs1} + {e.imm}) & 0xFFFFFFFFFFFFFFFE")
    e.rd_set(e.npc)
    e.jump(t)


_BRANCHES = {
    "beq": "{a} == {b}", "bne": "{a} != {b}",
    "blt": "({a} ^ S64) < ({b} ^ S64)", "bge": "({a} ^ S64) >= ({b} ^ S64)",
    "bltu": "{a} < {b}", "bgeu": "{a} >= {b}",
}


def _branch(pattern: str) -> Template:
    def build(e: Emitter) -> None:
        cond = pattern.replace("S64", SIGN64).format(a=e.rs1, b=e.rs2)
        e.branch(cond, f"({e.pc} + {e.imm}) & {M64}")
    return build


for _name, _pat in _BRANCHES.items():
    _def(_name, _branch(_pat))


# ---------------------------------------------------------------------------
# Loads and stores
# ---------------------------------------------------------------------------
_LOADS = {"lb": (1, True), "lh": (2, True), "lw": (4, True), "ld": (8, False),
          "lbu": (1, False), "lhu": (2, False), "lwu": (4, False)}
_STORES = {"sb": 1, "sh": 2, "sw": 4, "sd": 8}


def _load(size: int, is_signed: bool) -> Template:
    def build(e: Emitter) -> None:
        v = e.load(size, is_signed, add64(e.rs1, e.imm))
        e.rd_set(v)
    return build


def _store(size: int) -> Template:
    def build(e: Emitter) -> None:
        e.store(size, add64(e.rs1, e.imm), e.rs2)
    return build


for _name, (_size, _sgn) in _LOADS.items():
    _def(_name, _load(_size, _sgn))
for _name, _size in _STORES.items():
    _def(_name, _store(_size))


# ---------------------------------------------------------------------------
# A: atomics (chapter 8).  All go through the hart, which checks alignment
# and write permission and keeps the LR/SC reservation.
# ---------------------------------------------------------------------------
def _amo(op: str, size: int) -> Template:
    def build(e: Emitter) -> None:
        e.rd_set(e.amo(op, size, e.rs1, e.rs2))
    return build


for _op in ("amoadd", "amoswap", "amoxor", "amoor", "amoand", "amomin", "amomax",
            "amominu", "amomaxu"):
    _def(_op + "_w", _amo(_op, 4))
    _def(_op + "_d", _amo(_op, 8))


def _lr(size: int) -> Template:
    def build(e: Emitter) -> None:
        e.rd_set(e.lr(size, e.rs1))
    return build


def _sc(size: int) -> Template:
    def build(e: Emitter) -> None:
        e.rd_set(e.sc(size, e.rs1, e.rs2))
    return build


_def("lr_w", _lr(4))
_def("lr_d", _lr(8))
_def("sc_w", _sc(4))
_def("sc_d", _sc(8))


# ---------------------------------------------------------------------------
# Zicsr, Zifencei and the system instructions
# ---------------------------------------------------------------------------
_CSR_OPS = {"csrrw": (1, False), "csrrs": (2, False), "csrrc": (3, False),
            "csrrwi": (1, True), "csrrsi": (2, True), "csrrci": (3, True)}


def _csr(op: int, immediate: bool) -> Template:
    def build(e: Emitter) -> None:
        src = e.rs1_idx if immediate else e.rs1
        if e.static and op in (2, 3) and e.rs1_idx == "0":
            # csrr: a pure read; it may trap but never changes state.
            e.rd_set(e.call(f"h.csr_read({e.csr})"))
            return
        e.exit_call(f"h.csr_op({e.csr}, {op}, {src}, {e.rs1_idx}, {e.rd_idx}, {e.npc})")
    return build


for _name, (_op, _imm) in _CSR_OPS.items():
    _def(_name, _csr(_op, _imm))


@template("fence")
def _fence(e: Emitter) -> None:
    pass  # one hart at a time runs: memory is always coherent


@template("pause")
def _pause(e: Emitter) -> None:
    # A spin-wait hint: with several harts, give the others the host CPU.
    e.exit_call(f"h.pause({e.npc})")


@template("fence_i")
def _fence_i(e: Emitter) -> None:
    # Stores to translated code invalidate it when they happen; ending the
    # block makes the next instruction fetch see the new code.
    e.jump(e.npc)


@template("ecall")
def _ecall(e: Emitter) -> None:
    e.exit_call("h.ecall()")


@template("ebreak")
def _ebreak(e: Emitter) -> None:
    e.trap("3", e.pc)


@template("mret")
def _mret(e: Emitter) -> None:
    e.exit_call("h.mret()")


@template("sret")
def _sret(e: Emitter) -> None:
    e.exit_call("h.sret()")


@template("wfi")
def _wfi(e: Emitter) -> None:
    e.exit_call(f"h.wfi({e.npc})")


@template("sfence_vma")
def _sfence_vma(e: Emitter) -> None:
    e.exit_call(f"h.sfence_vma({e.rs1_idx}, {e.rs1}, {e.npc}, {e.rs2_idx}, {e.rs2})")


@template("illegal")
def _illegal(e: Emitter) -> None:
    e.trap("2", e.raw)


# Floating point templates live in isa_fp.py and register themselves here.
from pyvirt.cpu.riscv import isa_fp as _isa_fp  # noqa: E402

_isa_fp.register(_def)
HELPERS.update(_isa_fp.HELPERS)
