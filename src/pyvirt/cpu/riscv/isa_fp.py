"""F and D instruction templates (unprivileged ISA chapters 11 and 12).

f registers hold raw 64-bit IEEE patterns; single-precision values are
NaN-boxed.  The arithmetic itself is `fpu.py` (exact soft-float, every rounding
mode and flag); templates only move operands, resolve the rounding mode,
accrue fflags and mark mstatus.FS dirty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyvirt.cpu.riscv import fpu
from pyvirt.cpu.riscv.emit import Emitter, add64, sx32

HELPERS: dict[str, Any] = {"fpu": fpu}

Define = Callable[[str, Callable[[Emitter], None]], None]


def _rm(e: Emitter) -> str:
    """Expression for the effective rounding mode; traps on reserved modes."""
    if e.static:
        rm = int(e.rm_field)
        if rm == 7:
            return e.call("h.dyn_rm()")
        if rm > 4:
            e.trap("2", e.raw)
            return "0"
        return str(rm)
    return e.call(f"h.check_rm({e.rm_field})")


def _arith(name: str, nargs: int, rounding: bool) -> Callable[[Emitter], None]:
    def build(e: Emitter) -> None:
        e.fp_check()
        args = [e.f1, e.f2, e.f3][:nargs]
        if rounding:
            rm = _rm(e)
            if e.ended:
                return
            args.append(rm)
        t = e.tmp()
        e.line(f"{t}, fl = fpu.{name}({', '.join(args)})")
        e.line("h.fflags |= fl")
        e.fd_set(t)
    return build


def _to_int_reg(name: str, nargs: int, rounding: bool, with_flags: bool) -> Callable[[Emitter], None]:
    def build(e: Emitter) -> None:
        e.fp_check()
        args = [e.f1, e.f2][:nargs]
        if rounding:
            rm = _rm(e)
            if e.ended:
                return
            args.append(rm)
        t = e.tmp()
        if with_flags:
            e.line(f"{t}, fl = fpu.{name}({', '.join(args)})")
            e.line("if fl:")
            e.line("    h.fflags |= fl")
            e.line("    h.mstatus |= 0x6000")
        else:
            e.line(f"{t} = fpu.{name}({', '.join(args)})")
        e.rd_set(t)
    return build


def _from_int_reg(name: str) -> Callable[[Emitter], None]:
    def build(e: Emitter) -> None:
        e.fp_check()
        rm = _rm(e)
        if e.ended:
            return
        t = e.tmp()
        e.line(f"{t}, fl = fpu.{name}({e.rs1}, {rm})")
        e.line("h.fflags |= fl")
        e.fd_set(t)
    return build


def _sgnj(name: str) -> Callable[[Emitter], None]:
    def build(e: Emitter) -> None:
        e.fp_check()
        e.fd_set(f"fpu.{name}({e.f1}, {e.f2})")
    return build


def _fload(size: int) -> Callable[[Emitter], None]:
    def build(e: Emitter) -> None:
        e.fp_check()
        v = e.load(size, False, add64(e.rs1, e.imm))
        e.fd_set(f"{v} | 0xFFFFFFFF00000000" if size == 4 else v)
    return build


def _fstore(size: int) -> Callable[[Emitter], None]:
    def build(e: Emitter) -> None:
        e.fp_check()
        value = f"{e.f2} & 0xFFFFFFFF" if size == 4 else e.f2
        e.store(size, add64(e.rs1, e.imm), value)
    return build


def _fmv_x_w(e: Emitter) -> None:
    e.fp_check()
    e.rd_set(sx32(e.f1))


def _fmv_x_d(e: Emitter) -> None:
    e.fp_check()
    e.rd_set(e.f1)


def _fmv_w_x(e: Emitter) -> None:
    e.fp_check()
    e.fd_set(f"({e.rs1} & 0xFFFFFFFF) | 0xFFFFFFFF00000000")


def _fmv_d_x(e: Emitter) -> None:
    e.fp_check()
    e.fd_set(e.rs1)


def register(define: Define) -> None:
    for sfx in ("_s", "_d"):
        for op in ("fadd", "fsub", "fmul", "fdiv"):
            define(op + sfx, _arith(op + sfx, 2, True))
        define("fsqrt" + sfx, _arith("fsqrt" + sfx, 1, True))
        for op in ("fmadd", "fmsub", "fnmsub", "fnmadd"):
            define(op + sfx, _arith(op + sfx, 3, True))
        for op in ("fmin", "fmax"):
            define(op + sfx, _arith(op + sfx, 2, False))
        for op in ("fsgnj", "fsgnjn", "fsgnjx"):
            define(op + sfx, _sgnj(op + sfx))
        for op in ("feq", "flt", "fle"):
            define(op + sfx, _to_int_reg(op + sfx, 2, False, True))
        define("fclass" + sfx, _to_int_reg("fclass" + sfx, 1, False, False))
        for it in ("w", "wu", "l", "lu"):
            define(f"fcvt_{it}{sfx}", _to_int_reg(f"fcvt_{it}{sfx}", 1, True, True))
            define(f"fcvt{sfx}_{it}", _from_int_reg(f"fcvt{sfx}_{it}"))
    define("fcvt_s_d", _arith("fcvt_s_d", 1, True))
    define("fcvt_d_s", _arith("fcvt_d_s", 1, True))
    define("flw", _fload(4))
    define("fld", _fload(8))
    define("fsw", _fstore(4))
    define("fsd", _fstore(8))
    define("fmv_x_w", _fmv_x_w)
    define("fmv_x_d", _fmv_x_d)
    define("fmv_w_x", _fmv_w_x)
    define("fmv_d_x", _fmv_d_x)
