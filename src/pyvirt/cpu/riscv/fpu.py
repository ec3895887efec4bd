"""RISC-V F and D arithmetic (unprivileged ISA chapters "F" and "D"), as pure functions.

The hart keeps f registers as 64-bit unsigned ints holding raw IEEE 754 bit
patterns and calls these functions once per FP instruction.  The hart checks
mstatus.FS, decodes the instruction and resolves the dynamic rounding mode;
``rm`` here is always 0..4 (RNE, RTZ, RDN, RUP, RMM).  Flags come back in the
fflags layout (NV=16, DZ=8, OF=4, UF=2, NX=1) for the hart to accrue.

API (``x`` = integer register value, an unsigned 64-bit int; ``a, b, c`` = f
register values, unsigned 64-bit ints):

* ``fadd_d fsub_d fmul_d fdiv_d (a, b, rm) -> (bits, flags)``; ``fsqrt_d(a, rm)``;
  ``fmadd_d fmsub_d fnmsub_d fnmadd_d (a, b, c, rm)``; ``fmin_d fmax_d (a, b)
  -> (bits, flags)``; ``fsgnj_d fsgnjn_d fsgnjx_d (a, b) -> bits``;
  ``feq_d flt_d fle_d (a, b) -> (0 or 1, flags)``; ``fclass_d(a) -> mask``.
* The same names ending in ``_s`` take NaN-boxed registers and return boxed
  results.  An input whose upper 32 bits are not all ones is the canonical NaN
  (section "NaN Boxing of Narrower Values").  ``box_s(bits32) -> reg`` and
  ``unbox_s(reg) -> bits32`` convert.
* ``fcvt_{w,wu,l,lu}_{s,d}(a, rm) -> (x, flags)``: the integer register value;
  .w and .wu results are sign-extended from 32 bits.  NaN and out-of-range
  inputs saturate with NV (NaN gives the largest positive value).
* ``fcvt_{s,d}_{w,wu,l,lu}(x, rm) -> (bits, flags)``: .w/.wu use the low 32 bits.
* ``fcvt_s_d(a, rm)`` rounds; ``fcvt_d_s(a, rm)`` is exact (``rm`` is ignored).

Results are the canonical NaN for every NaN result and a signaling NaN operand
raises NV.  The exact arithmetic for every rounding mode lives in `fpu_exact`
(integer significands, one rounding routine).  For rm=RNE the common cases use
the host's binary64 arithmetic, which is IEEE 754 round-to-nearest-even, and
take the result only when its flags are proven cheaply: TwoSum for addition,
the exact integer significand product for multiplication, and the exactness
of quotient*divisor or root*root for division and square root; results that
are tiny, overflow or are NaN go to the exact path.  Single precision uses
binary64 then one rounding to binary32, which gives the correctly rounded
result for +, -, *, / and sqrt because 53 >= 2*24 + 2.  The single fused
multiply-add computes the (exact) product and the sum in binary64 and keeps the
result when the sum was exact or did not land on a binary32 midpoint; the
double one has an inlined integer path for normal operands and results.
Float-to-integer conversions in RNE, RTZ, RDN and RUP use Python's exact
round/int/floor/ceil of the value; integer-to-float ones use float(int) when
that is exact or the mode is RNE.
Measured on CPython 3.11 (typical operands): 2-4 M ops/s on these paths,
0.8-1.3 M ops/s on the exact path.
"""

from __future__ import annotations

from math import ceil, floor
from math import sqrt as _fsqrt
from struct import Struct

from pyvirt.cpu.riscv import fpu_exact as _x
from pyvirt.cpu.riscv.fpu_exact import DZ, NV, NX, OF, RDN, RMM, RNE, RTZ, RUP, UF

__all__ = [
    "NV", "DZ", "OF", "UF", "NX", "RNE", "RTZ", "RDN", "RUP", "RMM", "BOX", "CANONICAL_NAN_S",
    "CANONICAL_NAN_D", "box_s", "unbox_s", "fadd_d", "fsub_d", "fmul_d", "fdiv_d", "fsqrt_d",
    "fmadd_d", "fmsub_d", "fnmsub_d", "fnmadd_d", "fmin_d", "fmax_d", "fsgnj_d", "fsgnjn_d",
    "fsgnjx_d", "feq_d", "flt_d", "fle_d", "fclass_d", "fadd_s", "fsub_s", "fmul_s", "fdiv_s",
    "fsqrt_s", "fmadd_s", "fmsub_s", "fnmsub_s", "fnmadd_s", "fmin_s", "fmax_s", "fsgnj_s",
    "fsgnjn_s", "fsgnjx_s", "feq_s", "flt_s", "fle_s", "fclass_s", "fcvt_w_d", "fcvt_wu_d",
    "fcvt_l_d", "fcvt_lu_d", "fcvt_w_s", "fcvt_wu_s", "fcvt_l_s", "fcvt_lu_s", "fcvt_d_w",
    "fcvt_d_wu", "fcvt_d_l", "fcvt_d_lu", "fcvt_s_w", "fcvt_s_wu", "fcvt_s_l", "fcvt_s_lu",
    "fcvt_s_d", "fcvt_d_s",
]

_S, _D = _x.S, _x.D
M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1
BOX = 0xFFFFFFFF00000000
_BOXH = 0xFFFFFFFF
_SIGN_D = 1 << 63
_MAG_D = _SIGN_D - 1
_EXP_D = 0x7FF0000000000000
_M52 = (1 << 52) - 1
_M53 = (1 << 53) - 1
_H52 = 1 << 52
_INF = float("inf")
_DMIN = 2.0 ** -1022  # smallest normal binary64
_FMIN = 2.0 ** -126  # smallest normal binary32
CANONICAL_NAN_S = 0x7FC00000
CANONICAL_NAN_D = 0x7FF8000000000000

_QQ = Struct("<QQ")
_Q = Struct("<Q")
_pack_qq = _QQ.pack
_pack_q = _Q.pack
_unpack_q = _Q.unpack
_unpack_dd = Struct("<dd").unpack
_D1 = Struct("<d")
_unpack_d = _D1.unpack
_pack_d = _D1.pack
_unpack_fifi = Struct("<fIfI").unpack
_FI = Struct("<fI")
_unpack_fi = _FI.unpack
_pack_fi = _FI.pack

_ROUND_TO_INT = (round, int, floor, ceil)  # RNE (ties to even), RTZ, RDN, RUP


def box_s(bits: int) -> int:
    """NaN-box a binary32 pattern into a 64-bit f register value."""
    return (bits & M32) | BOX


def unbox_s(reg: int) -> int:
    """The binary32 pattern in an f register; the canonical NaN when not properly boxed."""
    return reg & M32 if reg >> 32 == _BOXH else CANONICAL_NAN_S


def _ret_s(result: tuple[int, int]) -> tuple[int, int]:
    return result[0] | BOX, result[1]


# -- double precision ------------------------------------------------------------------

def fadd_d(a: int, b: int, rm: int) -> tuple[int, int]:
    if not rm:
        x, y = _unpack_dd(_pack_qq(a, b))
        s = x + y
        if -_INF < s < _INF:
            # TwoSum: err is the exact rounding error of s (sums of finite
            # doubles never underflow inexactly).
            t = s - x
            if (x - (s - t)) + (y - t):
                return _unpack_q(_pack_d(s))[0], NX
            return _unpack_q(_pack_d(s))[0], 0
    return _x.add(_D, a, b, rm)


def fsub_d(a: int, b: int, rm: int) -> tuple[int, int]:
    if not rm:
        x, y = _unpack_dd(_pack_qq(a, b))
        y = -y
        s = x + y
        if -_INF < s < _INF:
            t = s - x
            if (x - (s - t)) + (y - t):
                return _unpack_q(_pack_d(s))[0], NX
            return _unpack_q(_pack_d(s))[0], 0
    return _x.add(_D, a, b ^ _SIGN_D, rm)


def fmul_d(a: int, b: int, rm: int) -> tuple[int, int]:
    if not rm:
        x, y = _unpack_dd(_pack_qq(a, b))
        p = x * y
        if _DMIN < abs(p) < _INF:
            if a & _EXP_D and b & _EXP_D:
                # Exact iff the 105/106-bit significand product fits in 53 bits.
                t = ((a & _M52) | _H52) * ((b & _M52) | _H52)
                return _unpack_q(_pack_d(p))[0], (NX if t & (_M53 if t >> 105 else _M52) else 0)
        elif p == 0.0 and (x == 0.0 or y == 0.0):
            return _unpack_q(_pack_d(p))[0], 0
    return _x.mul(_D, a, b, rm)


def fdiv_d(a: int, b: int, rm: int) -> tuple[int, int]:
    if not rm:
        x, y = _unpack_dd(_pack_qq(a, b))
        if y:
            q = x / y
            if _DMIN < abs(q) < _INF:
                if a & _EXP_D and b & _EXP_D:
                    r = _unpack_q(_pack_d(q))[0]
                    # Exact iff q * y == x, i.e. the significand product is the
                    # dividend's significand times a power of two.
                    t = ((r & _M52) | _H52) * ((b & _M52) | _H52)
                    ma = (a & _M52) | _H52
                    return r, (0 if t == ma << (t.bit_length() - 53) else NX)
            elif q == 0.0 and x == 0.0:
                return _unpack_q(_pack_d(q))[0], 0
    return _x.div(_D, a, b, rm)


def fsqrt_d(a: int, rm: int) -> tuple[int, int]:
    if not rm:
        x = _unpack_d(_pack_q(a))[0]
        if 0.0 < x < _INF:
            r = _unpack_q(_pack_d(_fsqrt(x)))[0]
            t = ((r & _M52) | _H52) ** 2
            ma = (a & _M52) | (_H52 if a & _EXP_D else 0)
            return r, (0 if t == ma << (t.bit_length() - ma.bit_length()) else NX)
    return _x.sqrt(_D, a, rm)


def _fma_d(a: int, b: int, c: int, rm: int, neg_prod: int, neg_add: int) -> tuple[int, int]:
    """Fused multiply-add; for RNE with normal operands and result, integer arithmetic inlined."""
    if not rm:
        ea = (a >> 52) & 0x7FF
        eb = (b >> 52) & 0x7FF
        ec = (c >> 52) & 0x7FF
        if 0 < ea < 0x7FF and 0 < eb < 0x7FF and 0 < ec < 0x7FF:
            t = ((a & _M52) | _H52) * ((b & _M52) | _H52)
            if (a ^ b) >> 63 != neg_prod:
                t = -t
            mc = (c & _M52) | _H52
            if c >> 63 != neg_add:
                mc = -mc
            d = ec - ea - eb + 1075  # exponent of c's last bit minus the product's
            if 0 <= d < 128:
                s = (mc << d) + t
                e = ea + eb - 2150
            elif -128 < d < 0:
                s = (t << -d) + mc
                e = ec - 1075
            else:
                s = 0
            if s:
                sign = 0
                if s < 0:
                    sign = _SIGN_D
                    s = -s
                sh = s.bit_length() - 53
                flags = 0
                if sh > 0:
                    m = s >> sh
                    rem = s & ((1 << sh) - 1)
                    if rem:
                        flags = NX
                        half = 1 << (sh - 1)
                        if rem > half or (rem == half and m & 1):
                            m += 1
                            if m >> 53:
                                m >>= 1
                                sh += 1
                else:
                    m = s << -sh
                be = e + sh + 1075  # biased exponent of the result
                if 0 < be < 0x7FF:
                    return sign | (((be - 1) << 52) + m), flags
    return _x.fma(_D, a, b, c, rm, neg_prod, neg_add)


def fmadd_d(a: int, b: int, c: int, rm: int) -> tuple[int, int]:
    return _fma_d(a, b, c, rm, 0, 0)


def fmsub_d(a: int, b: int, c: int, rm: int) -> tuple[int, int]:
    return _fma_d(a, b, c, rm, 0, 1)


def fnmsub_d(a: int, b: int, c: int, rm: int) -> tuple[int, int]:
    return _fma_d(a, b, c, rm, 1, 0)


def fnmadd_d(a: int, b: int, c: int, rm: int) -> tuple[int, int]:
    return _fma_d(a, b, c, rm, 1, 1)


def fmin_d(a: int, b: int) -> tuple[int, int]:
    x, y = _unpack_dd(_pack_qq(a, b))
    if x < y:
        return a, 0
    if y < x:
        return b, 0
    return _x.minmax(_D, a, b, False)


def fmax_d(a: int, b: int) -> tuple[int, int]:
    x, y = _unpack_dd(_pack_qq(a, b))
    if x > y:
        return a, 0
    if y > x:
        return b, 0
    return _x.minmax(_D, a, b, True)


def fsgnj_d(a: int, b: int) -> int:
    return (a & _MAG_D) | (b & _SIGN_D)


def fsgnjn_d(a: int, b: int) -> int:
    return (a & _MAG_D) | (~b & _SIGN_D)


def fsgnjx_d(a: int, b: int) -> int:
    return a ^ (b & _SIGN_D)


def feq_d(a: int, b: int) -> tuple[int, int]:
    x, y = _unpack_dd(_pack_qq(a, b))
    if x == y:
        return 1, 0
    if x == x and y == y:
        return 0, 0
    return _x.compare(_D, a, b, 0)


def flt_d(a: int, b: int) -> tuple[int, int]:
    x, y = _unpack_dd(_pack_qq(a, b))
    if x < y:
        return 1, 0
    if x == x and y == y:
        return 0, 0
    return 0, NV


def fle_d(a: int, b: int) -> tuple[int, int]:
    x, y = _unpack_dd(_pack_qq(a, b))
    if x <= y:
        return 1, 0
    if x == x and y == y:
        return 0, 0
    return 0, NV


def fclass_d(a: int) -> int:
    return _x.classify(_D, a)


# -- single precision ------------------------------------------------------------------

def fadd_s(a: int, b: int, rm: int) -> tuple[int, int]:
    if not rm:
        x, hx, y, hy = _unpack_fifi(_pack_qq(a, b))
        if hx == _BOXH and hy == _BOXH:
            d = x + y
            if -_INF < d < _INF:
                try:
                    buf = _pack_fi(d, _BOXH)
                except OverflowError:
                    buf = b""
                if buf:
                    # A binary32 sum below the smallest normal is exact, so never UF.
                    t = d - x
                    if (x - (d - t)) + (y - t) or _unpack_fi(buf)[0] != d:
                        return _unpack_q(buf)[0], NX
                    return _unpack_q(buf)[0], 0
    return _ret_s(_x.add(_S, unbox_s(a), unbox_s(b), rm))


def fsub_s(a: int, b: int, rm: int) -> tuple[int, int]:
    if not rm:
        x, hx, y, hy = _unpack_fifi(_pack_qq(a, b))
        if hx == _BOXH and hy == _BOXH:
            d = x - y
            if -_INF < d < _INF:
                try:
                    buf = _pack_fi(d, _BOXH)
                except OverflowError:
                    buf = b""
                if buf:
                    t = d - x
                    if (x - (d - t)) - (y + t) or _unpack_fi(buf)[0] != d:
                        return _unpack_q(buf)[0], NX
                    return _unpack_q(buf)[0], 0
    return _ret_s(_x.add(_S, unbox_s(a), unbox_s(b) ^ 0x80000000, rm))


def fmul_s(a: int, b: int, rm: int) -> tuple[int, int]:
    if not rm:
        x, hx, y, hy = _unpack_fifi(_pack_qq(a, b))
        if hx == _BOXH and hy == _BOXH:
            d = x * y  # exact: 48-bit significands, exponents well inside binary64
            if -_INF < d < _INF:
                try:
                    buf = _pack_fi(d, _BOXH)
                except OverflowError:
                    buf = b""
                if buf:
                    s = _unpack_fi(buf)[0]
                    if s == d:
                        return _unpack_q(buf)[0], 0
                    if abs(s) > _FMIN:
                        return _unpack_q(buf)[0], NX
    return _ret_s(_x.mul(_S, unbox_s(a), unbox_s(b), rm))


def fdiv_s(a: int, b: int, rm: int) -> tuple[int, int]:
    if not rm:
        x, hx, y, hy = _unpack_fifi(_pack_qq(a, b))
        if hx == _BOXH and hy == _BOXH and y:
            d = x / y
            if -_INF < d < _INF:
                try:
                    buf = _pack_fi(d, _BOXH)
                except OverflowError:
                    buf = b""
                if buf:
                    s = _unpack_fi(buf)[0]
                    if s * y == x:  # exact product of two binary32 values
                        return _unpack_q(buf)[0], 0
                    if abs(s) > _FMIN:
                        return _unpack_q(buf)[0], NX
                    if d == 0.0:  # finite / inf
                        return _unpack_q(buf)[0], 0
    return _ret_s(_x.div(_S, unbox_s(a), unbox_s(b), rm))


def fsqrt_s(a: int, rm: int) -> tuple[int, int]:
    if not rm:
        x, hx = _unpack_fi(_pack_q(a))
        if hx == _BOXH and 0.0 < x:
            buf = _pack_fi(_fsqrt(x), _BOXH)
            s = _unpack_fi(buf)[0]
            return _unpack_q(buf)[0], (0 if s * s == x else NX)
    return _ret_s(_x.sqrt(_S, unbox_s(a), rm))


def _fma_s(a: int, b: int, c: int, rm: int, neg_prod: int, neg_add: int) -> tuple[int, int]:
    """Fused multiply-add; for RNE through binary64 when that provably rounds once."""
    if not rm:
        x, hx, y, hy = _unpack_fifi(_pack_qq(a, b))
        z, hz = _unpack_fi(_pack_q(c))
        if hx == _BOXH and hy == _BOXH and hz == _BOXH:
            p = -(x * y) if neg_prod else x * y  # exact in binary64
            if neg_add:
                z = -z
            d = p + z
            if -_INF < d < _INF:
                try:
                    buf = _pack_fi(d, _BOXH)
                except OverflowError:
                    buf = b""
                if buf:
                    s = _unpack_fi(buf)[0]
                    t = d - p
                    if not (p - (d - t)) + (z - t):  # d is exact (TwoSum)
                        if s == d:
                            return _unpack_q(buf)[0], 0
                        if abs(s) > _FMIN:
                            return _unpack_q(buf)[0], NX
                    elif abs(s) > _FMIN and _unpack_q(_pack_d(d))[0] & 0x1FFFFFFF != 0x10000000:
                        # d was rounded, but it is no binary32 midpoint, so rounding
                        # it again gives the binary32 nearest to the exact value.
                        return _unpack_q(buf)[0], NX
    return _ret_s(_x.fma(_S, unbox_s(a), unbox_s(b), unbox_s(c), rm, neg_prod, neg_add))


def fmadd_s(a: int, b: int, c: int, rm: int) -> tuple[int, int]:
    return _fma_s(a, b, c, rm, 0, 0)


def fmsub_s(a: int, b: int, c: int, rm: int) -> tuple[int, int]:
    return _fma_s(a, b, c, rm, 0, 1)


def fnmsub_s(a: int, b: int, c: int, rm: int) -> tuple[int, int]:
    return _fma_s(a, b, c, rm, 1, 0)


def fnmadd_s(a: int, b: int, c: int, rm: int) -> tuple[int, int]:
    return _fma_s(a, b, c, rm, 1, 1)


def fmin_s(a: int, b: int) -> tuple[int, int]:
    x, hx, y, hy = _unpack_fifi(_pack_qq(a, b))
    if hx == _BOXH and hy == _BOXH:
        if x < y:
            return a, 0
        if y < x:
            return b, 0
    return _ret_s(_x.minmax(_S, unbox_s(a), unbox_s(b), False))


def fmax_s(a: int, b: int) -> tuple[int, int]:
    x, hx, y, hy = _unpack_fifi(_pack_qq(a, b))
    if hx == _BOXH and hy == _BOXH:
        if x > y:
            return a, 0
        if y > x:
            return b, 0
    return _ret_s(_x.minmax(_S, unbox_s(a), unbox_s(b), True))


def fsgnj_s(a: int, b: int) -> int:
    return (unbox_s(a) & 0x7FFFFFFF) | (unbox_s(b) & 0x80000000) | BOX


def fsgnjn_s(a: int, b: int) -> int:
    return (unbox_s(a) & 0x7FFFFFFF) | (~unbox_s(b) & 0x80000000) | BOX


def fsgnjx_s(a: int, b: int) -> int:
    return unbox_s(a) ^ (unbox_s(b) & 0x80000000) | BOX


def feq_s(a: int, b: int) -> tuple[int, int]:
    x, hx, y, hy = _unpack_fifi(_pack_qq(a, b))
    if hx == _BOXH and hy == _BOXH:
        if x == y:
            return 1, 0
        if x == x and y == y:
            return 0, 0
    return _x.compare(_S, unbox_s(a), unbox_s(b), 0)


def flt_s(a: int, b: int) -> tuple[int, int]:
    x, hx, y, hy = _unpack_fifi(_pack_qq(a, b))
    if hx == _BOXH and hy == _BOXH:
        if x < y:
            return 1, 0
        if x == x and y == y:
            return 0, 0
    return _x.compare(_S, unbox_s(a), unbox_s(b), 1)


def fle_s(a: int, b: int) -> tuple[int, int]:
    x, hx, y, hy = _unpack_fifi(_pack_qq(a, b))
    if hx == _BOXH and hy == _BOXH:
        if x <= y:
            return 1, 0
        if x == x and y == y:
            return 0, 0
    return _x.compare(_S, unbox_s(a), unbox_s(b), 2)


def fclass_s(a: int) -> int:
    return _x.classify(_S, unbox_s(a))


# -- conversions -------------------------------------------------------------------------
# Integer results: section "Single-Precision Floating-Point Conversion and Move
# Instructions" (the table of NaN/infinity/out-of-range results).

_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def _sext32(v: int) -> int:
    return v | BOX if v & 0x80000000 else v


def _to_w(F: _x.Fmt, a: int, rm: int) -> tuple[int, int]:
    v, flags = _x.to_int(F, a, rm, _I32_MIN, _I32_MAX)
    return v & M64, flags


def _to_wu(F: _x.Fmt, a: int, rm: int) -> tuple[int, int]:
    v, flags = _x.to_int(F, a, rm, 0, M32)
    return _sext32(v), flags


def _to_l(F: _x.Fmt, a: int, rm: int) -> tuple[int, int]:
    v, flags = _x.to_int(F, a, rm, _I64_MIN, _I64_MAX)
    return v & M64, flags


def _to_lu(F: _x.Fmt, a: int, rm: int) -> tuple[int, int]:
    return _x.to_int(F, a, rm, 0, M64)


def _fast_int(x: float, rm: int, lo: int, hi: int) -> tuple[int, int] | None:
    """Round a finite float to an integer with the host (modes RNE..RUP); None if out of range."""
    if -_INF < x < _INF:
        i = _ROUND_TO_INT[rm](x)
        if lo <= i <= hi:
            return i, (NX if i != x else 0)
    return None


def fcvt_w_d(a: int, rm: int) -> tuple[int, int]:
    if rm < 4:
        r = _fast_int(_unpack_d(_pack_q(a))[0], rm, _I32_MIN, _I32_MAX)
        if r is not None:
            return r[0] & M64, r[1]
    return _to_w(_D, a, rm)


def fcvt_wu_d(a: int, rm: int) -> tuple[int, int]:
    if rm < 4:
        r = _fast_int(_unpack_d(_pack_q(a))[0], rm, 0, M32)
        if r is not None:
            return _sext32(r[0]), r[1]
    return _to_wu(_D, a, rm)


def fcvt_l_d(a: int, rm: int) -> tuple[int, int]:
    if rm < 4:
        r = _fast_int(_unpack_d(_pack_q(a))[0], rm, _I64_MIN, _I64_MAX)
        if r is not None:
            return r[0] & M64, r[1]
    return _to_l(_D, a, rm)


def fcvt_lu_d(a: int, rm: int) -> tuple[int, int]:
    if rm < 4:
        r = _fast_int(_unpack_d(_pack_q(a))[0], rm, 0, M64)
        if r is not None:
            return r
    return _to_lu(_D, a, rm)


def fcvt_w_s(a: int, rm: int) -> tuple[int, int]:
    if rm < 4:
        x, hx = _unpack_fi(_pack_q(a))
        if hx == _BOXH:
            r = _fast_int(x, rm, _I32_MIN, _I32_MAX)
            if r is not None:
                return r[0] & M64, r[1]
    return _to_w(_S, unbox_s(a), rm)


def fcvt_wu_s(a: int, rm: int) -> tuple[int, int]:
    if rm < 4:
        x, hx = _unpack_fi(_pack_q(a))
        if hx == _BOXH:
            r = _fast_int(x, rm, 0, M32)
            if r is not None:
                return _sext32(r[0]), r[1]
    return _to_wu(_S, unbox_s(a), rm)


def fcvt_l_s(a: int, rm: int) -> tuple[int, int]:
    if rm < 4:
        x, hx = _unpack_fi(_pack_q(a))
        if hx == _BOXH:
            r = _fast_int(x, rm, _I64_MIN, _I64_MAX)
            if r is not None:
                return r[0] & M64, r[1]
    return _to_l(_S, unbox_s(a), rm)


def fcvt_lu_s(a: int, rm: int) -> tuple[int, int]:
    if rm < 4:
        x, hx = _unpack_fi(_pack_q(a))
        if hx == _BOXH:
            r = _fast_int(x, rm, 0, M64)
            if r is not None:
                return r
    return _to_lu(_S, unbox_s(a), rm)


def _from_int_d(v: int, rm: int) -> tuple[int, int]:
    if -(1 << 53) <= v <= 1 << 53:
        return _unpack_q(_pack_d(float(v)))[0], 0  # exact
    if not rm:
        f = float(v)  # int -> float rounds to nearest even
        return _unpack_q(_pack_d(f))[0], (NX if f != v else 0)
    return _x.from_int(_D, v, rm)


def _from_int_s(v: int, rm: int) -> tuple[int, int]:
    if -(1 << 24) <= v <= 1 << 24:
        return _unpack_q(_pack_fi(float(v), _BOXH))[0], 0  # exact
    if not rm and -(1 << 53) <= v <= 1 << 53:
        buf = _pack_fi(float(v), _BOXH)  # exact in binary64, one rounding to binary32
        return _unpack_q(buf)[0], (NX if _unpack_fi(buf)[0] != v else 0)
    return _ret_s(_x.from_int(_S, v, rm))


def _w(x: int) -> int:
    x &= M32
    return x - (1 << 32) if x & 0x80000000 else x


def _l(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


def fcvt_d_w(x: int, rm: int) -> tuple[int, int]:
    return _from_int_d(_w(x), rm)


def fcvt_d_wu(x: int, rm: int) -> tuple[int, int]:
    return _from_int_d(x & M32, rm)


def fcvt_d_l(x: int, rm: int) -> tuple[int, int]:
    return _from_int_d(_l(x), rm)


def fcvt_d_lu(x: int, rm: int) -> tuple[int, int]:
    return _from_int_d(x, rm)


def fcvt_s_w(x: int, rm: int) -> tuple[int, int]:
    return _from_int_s(_w(x), rm)


def fcvt_s_wu(x: int, rm: int) -> tuple[int, int]:
    return _from_int_s(x & M32, rm)


def fcvt_s_l(x: int, rm: int) -> tuple[int, int]:
    return _from_int_s(_l(x), rm)


def fcvt_s_lu(x: int, rm: int) -> tuple[int, int]:
    return _from_int_s(x, rm)


def fcvt_s_d(a: int, rm: int) -> tuple[int, int]:
    if not rm:
        x = _unpack_d(_pack_q(a))[0]
        if x == x:
            try:
                buf = _pack_fi(x, _BOXH)
            except OverflowError:
                buf = b""
            if buf:
                s = _unpack_fi(buf)[0]
                if s == x:
                    return _unpack_q(buf)[0], 0
                if abs(s) > _FMIN:
                    return _unpack_q(buf)[0], NX
    return _ret_s(_x.convert(_D, _S, a, rm))


def fcvt_d_s(a: int, rm: int) -> tuple[int, int]:
    x, hx = _unpack_fi(_pack_q(a))
    if hx == _BOXH and x == x:
        return _unpack_q(_pack_d(x))[0], 0  # binary32 -> binary64 is exact
    return _x.convert(_S, _D, unbox_s(a), rm)
