"""Exact IEEE 754 binary32/binary64 arithmetic on raw bit patterns (the slow path of `fpu`).

Every function takes and returns the raw encoding of one format (32-bit ints for
binary32, 64-bit for binary64; NaN-boxing is `fpu`'s business) and returns
``(bits, fflags)``.  The arithmetic is done on Python integers: an operation
computes its exact result as ``(-1)**sign * sig * 2**exp`` (or, for division
and square root, a significand with at least two bits beyond the last kept bit
whose lowest bit is a "sticky" bit standing for a nonzero remainder) and
`round_pack` rounds it once, in any of the five RISC-V rounding modes.

RISC-V specifics (unprivileged ISA, chapter "F" section "Floating-Point Control
and Status Register" and "Subnormal Arithmetic"; chapter "D"):

* NaN results are always the canonical NaN; payloads are never propagated and a
  signaling NaN operand raises NV.
* Tininess is detected after rounding: a result is tiny when rounding it to the
  format's precision with an unbounded exponent range gives a magnitude below
  the smallest normal number; UF is raised when the result is tiny and inexact.
"""

from __future__ import annotations

from math import isqrt

RNE, RTZ, RDN, RUP, RMM = 0, 1, 2, 3, 4
NV, DZ, OF, UF, NX = 16, 8, 4, 2, 1


class Fmt:
    """Constants of one binary interchange format."""

    __slots__ = (
        "ebits", "mbits", "p", "width", "bias", "emin", "emax", "qmin", "qmax",
        "sign", "mag", "emask", "mmask", "hidden", "inf", "qbit", "nan", "max",
        "sign_shift",
    )

    def __init__(self, ebits: int, mbits: int) -> None:
        self.ebits = ebits
        self.mbits = mbits
        self.p = mbits + 1  # precision, counting the hidden bit
        self.width = 1 + ebits + mbits
        self.bias = (1 << (ebits - 1)) - 1
        self.emin = 1 - self.bias
        self.emax = self.bias
        self.qmin = self.emin - mbits  # exponent of the last bit of a subnormal
        self.qmax = self.emax - mbits  # exponent of the last bit in the top binade
        self.sign_shift = self.width - 1
        self.sign = 1 << self.sign_shift
        self.mag = self.sign - 1
        self.emask = (1 << ebits) - 1
        self.mmask = (1 << mbits) - 1
        self.hidden = 1 << mbits
        self.inf = self.emask << mbits
        self.qbit = 1 << (mbits - 1)
        self.nan = self.inf | self.qbit  # canonical NaN
        self.max = self.inf - 1  # largest finite magnitude


S = Fmt(8, 23)
D = Fmt(11, 52)


def is_nan(F: Fmt, a: int) -> bool:
    return (a & F.mag) > F.inf


def is_snan(F: Fmt, a: int) -> bool:
    m = a & F.mag
    return m > F.inf and not m & F.qbit


def _nan_result(F: Fmt, *ops: int) -> tuple[int, int]:
    """Canonical NaN; NV when any operand is a signaling NaN."""
    inf, qbit, mag = F.inf, F.qbit, F.mag
    for a in ops:
        m = a & mag
        if m > inf and not m & qbit:
            return F.nan, NV
    return F.nan, 0


def decode(F: Fmt, a: int) -> tuple[int, int]:
    """(significand, exponent) of a finite value's magnitude: |a| = sig * 2**exp."""
    e = (a >> F.mbits) & F.emask
    if e:
        return (a & F.mmask) | F.hidden, e + F.qmin - 1
    return a & F.mmask, F.qmin


def round_up(m: int, rem: int, sh: int, sign: int, rm: int) -> bool:
    """Whether truncated magnitude `m` with discarded bits `rem` (of `sh` bits, nonzero) rounds up."""
    if rm == RNE:
        half = 1 << (sh - 1)
        return rem > half or (rem == half and bool(m & 1))
    if rm == RMM:
        return rem >= 1 << (sh - 1)
    if rm == RDN:
        return bool(sign)
    if rm == RUP:
        return not sign
    return False


def round_pack(sign: int, exp: int, sig: int, F: Fmt, rm: int) -> tuple[int, int]:
    """Round (-1)**sign * sig * 2**exp (sig > 0) to format F in mode rm; return (bits, flags).

    The value may be inexact in its last bit (sticky) provided sig carries at
    least two bits beyond the format's precision.
    """
    p = F.p
    n = sig.bit_length()
    q = exp + n - p  # exponent of the last kept bit for a p-bit significand
    tiny = False
    if q < F.qmin:
        tiny = True
        if q == F.qmin - 1 and n > p:
            # Just below the smallest normal: tininess is decided after rounding
            # to p bits with an unbounded exponent range.
            sh = n - p
            m = sig >> sh
            rem = sig & ((1 << sh) - 1)
            if rem and round_up(m, rem, sh, sign, rm) and (m + 1) >> p:
                tiny = False
        q = F.qmin
    sh = q - exp
    flags = 0
    if sh <= 0:
        m = sig << -sh
    else:
        m = sig >> sh
        rem = sig & ((1 << sh) - 1)
        if rem:
            flags = (NX | UF) if tiny else NX
            if rm == RNE:
                half = 1 << (sh - 1)
                if rem > half or (rem == half and m & 1):
                    m += 1
            elif rm == RMM:
                if rem >= 1 << (sh - 1):
                    m += 1
            elif rm == RDN:
                if sign:
                    m += 1
            elif rm == RUP:
                if not sign:
                    m += 1
            if m >> p:
                m >>= 1
                q += 1
    if q > F.qmax:
        if rm == RTZ or (rm == RDN and not sign) or (rm == RUP and sign):
            mag = F.max
        else:
            mag = F.inf
        return (sign << F.sign_shift) | mag, OF | NX
    # A subnormal has q == qmin and m below the hidden bit; a carry into the
    # hidden bit lands on the smallest normal by the same formula.
    return (sign << F.sign_shift) | (((q - F.qmin) << F.mbits) + m), flags


def _zero_sign(sa: int, sb: int, rm: int) -> int:
    """Sign of an exact zero sum (IEEE 754-2019 6.3): +0 unless both are -0 or rounding down."""
    return (sa | sb) if rm == RDN else (sa & sb)


# -- arithmetic -------------------------------------------------------------------------

def add(F: Fmt, a: int, b: int, rm: int) -> tuple[int, int]:
    inf, mag, ss = F.inf, F.mag, F.sign_shift
    am = a & mag
    bm = b & mag
    if am >= inf or bm >= inf:
        if am > inf or bm > inf:
            return _nan_result(F, a, b)
        if am == bm and (a ^ b) >> ss:
            return F.nan, NV  # inf - inf
        return (a if am == inf else b), 0
    sa = a >> ss
    sb = b >> ss
    ma, ea = decode(F, am)
    mb, eb = decode(F, bm)
    if ea > eb:
        ma <<= ea - eb
        e = eb
    else:
        mb <<= eb - ea
        e = ea
    s = (-ma if sa else ma) + (-mb if sb else mb)
    if s > 0:
        return round_pack(0, e, s, F, rm)
    if s < 0:
        return round_pack(1, e, -s, F, rm)
    return _zero_sign(sa, sb, rm) << ss, 0


def sub(F: Fmt, a: int, b: int, rm: int) -> tuple[int, int]:
    return add(F, a, b ^ F.sign, rm)


def mul(F: Fmt, a: int, b: int, rm: int) -> tuple[int, int]:
    inf, mag, ss = F.inf, F.mag, F.sign_shift
    am = a & mag
    bm = b & mag
    if am > inf or bm > inf:
        return _nan_result(F, a, b)
    sign = (a ^ b) >> ss
    if am == inf or bm == inf:
        if am == 0 or bm == 0:
            return F.nan, NV  # inf * 0
        return (sign << ss) | inf, 0
    if am == 0 or bm == 0:
        return sign << ss, 0
    ma, ea = decode(F, am)
    mb, eb = decode(F, bm)
    return round_pack(sign, ea + eb, ma * mb, F, rm)


def div(F: Fmt, a: int, b: int, rm: int) -> tuple[int, int]:
    inf, mag, ss = F.inf, F.mag, F.sign_shift
    am = a & mag
    bm = b & mag
    if am > inf or bm > inf:
        return _nan_result(F, a, b)
    sign = (a ^ b) >> ss
    if am == inf:
        if bm == inf:
            return F.nan, NV
        return (sign << ss) | inf, 0
    if bm == inf:
        return sign << ss, 0
    if bm == 0:
        if am == 0:
            return F.nan, NV
        return (sign << ss) | inf, DZ
    if am == 0:
        return sign << ss, 0
    ma, ea = decode(F, am)
    mb, eb = decode(F, bm)
    # Scale the dividend so that the quotient has at least p + 2 bits.
    k = max(0, F.p + 3 + mb.bit_length() - ma.bit_length())
    q, r = divmod(ma << k, mb)
    if r:
        q |= 1
    return round_pack(sign, ea - eb - k, q, F, rm)


def sqrt(F: Fmt, a: int, rm: int) -> tuple[int, int]:
    inf, mag = F.inf, F.mag
    am = a & mag
    if am > inf:
        return _nan_result(F, a)
    if am == 0:
        return a, 0  # sqrt(-0) = -0
    if a & F.sign:
        return F.nan, NV
    if am == inf:
        return a, 0
    m, e = decode(F, am)
    if e & 1:
        m <<= 1
        e -= 1
    k = max(0, F.p + 3 - (m.bit_length() >> 1)) + 1
    m <<= 2 * k
    e -= 2 * k
    r = isqrt(m)
    if r * r != m:
        r |= 1
    return round_pack(0, e >> 1, r, F, rm)


def fma(F: Fmt, a: int, b: int, c: int, rm: int, neg_prod: int, neg_add: int) -> tuple[int, int]:
    """(-1)**neg_prod * a * b + (-1)**neg_add * c with one rounding."""
    inf, mag, ss = F.inf, F.mag, F.sign_shift
    am = a & mag
    bm = b & mag
    cm = c & mag
    if am > inf or bm > inf or cm > inf:
        bits, flags = _nan_result(F, a, b, c)
        # inf * 0 is invalid even when the addend is a quiet NaN (chapter "F", FMA).
        if (am == inf and bm == 0) or (am == 0 and bm == inf):
            flags = NV
        return bits, flags
    sp = ((a ^ b) >> ss) ^ neg_prod
    sc = (c >> ss) ^ neg_add
    if am == inf or bm == inf:
        if am == 0 or bm == 0:
            return F.nan, NV
        if cm == inf and sp != sc:
            return F.nan, NV
        return (sp << ss) | inf, 0
    if cm == inf:
        return (sc << ss) | inf, 0
    mc, ec = decode(F, cm)
    if am == 0 or bm == 0:
        mp, ep = 0, ec
    else:
        ma, ea = decode(F, am)
        mb, eb = decode(F, bm)
        mp, ep = ma * mb, ea + eb
    if ep > ec:
        mp <<= ep - ec
        e = ec
    else:
        mc <<= ec - ep
        e = ep
    s = (-mp if sp else mp) + (-mc if sc else mc)
    if s > 0:
        return round_pack(0, e, s, F, rm)
    if s < 0:
        return round_pack(1, e, -s, F, rm)
    return _zero_sign(sp, sc, rm) << ss, 0


# -- sign-free operations ---------------------------------------------------------------

def _key(F: Fmt, a: int) -> int:
    """Total order key of a non-NaN encoding with -0 < +0."""
    return a if not a & F.sign else F.sign - 1 - a


def minmax(F: Fmt, a: int, b: int, is_max: bool) -> tuple[int, int]:
    """fmin/fmax (chapter "F", "Single-Precision Floating-Point Computational Instructions").

    IEEE 754-2019 minimumNumber/maximumNumber: a NaN operand is ignored, both
    NaN gives the canonical NaN, -0 is less than +0, signaling NaNs raise NV.
    """
    an = is_nan(F, a)
    bn = is_nan(F, b)
    if an or bn:
        flags = NV if is_snan(F, a) or is_snan(F, b) else 0
        if an and bn:
            return F.nan, flags
        return (b if an else a), flags
    ka = _key(F, a)
    kb = _key(F, b)
    if is_max:
        return (a if ka >= kb else b), 0
    return (a if ka <= kb else b), 0


def _cmp_key(F: Fmt, a: int) -> int:
    return 0 if not a & F.mag else _key(F, a)


def compare(F: Fmt, a: int, b: int, op: int) -> tuple[int, int]:
    """op 0: feq (quiet), 1: flt, 2: fle (signaling); returns (0/1, flags)."""
    if is_nan(F, a) or is_nan(F, b):
        if op or is_snan(F, a) or is_snan(F, b):
            return 0, NV
        return 0, 0
    ka = _cmp_key(F, a)
    kb = _cmp_key(F, b)
    if op == 0:
        return int(ka == kb), 0
    if op == 1:
        return int(ka < kb), 0
    return int(ka <= kb), 0


def classify(F: Fmt, a: int) -> int:
    """fclass mask: bit 0 -inf ... 7 +inf, 8 signaling NaN, 9 quiet NaN."""
    neg = a & F.sign
    am = a & F.mag
    if am == F.inf:
        return 1 if neg else 128
    if am > F.inf:
        return 512 if am & F.qbit else 256
    if am == 0:
        return 8 if neg else 16
    if am < F.hidden:
        return 4 if neg else 32
    return 2 if neg else 64


# -- conversions -------------------------------------------------------------------------

def to_int(F: Fmt, a: int, rm: int, lo: int, hi: int) -> tuple[int, int]:
    """Round to an integer in [lo, hi]; out of range or NaN saturates with NV (NaN -> hi)."""
    am = a & F.mag
    if am > F.inf:
        return hi, NV
    sign = a >> F.sign_shift
    if am == F.inf:
        return (lo if sign else hi), NV
    m, e = decode(F, am)
    flags = 0
    if e >= 0:
        if e > 64:
            return (lo if sign else hi), NV
        v = m << e
    else:
        sh = -e
        v = m >> sh
        rem = m & ((1 << sh) - 1)
        if rem:
            flags = NX
            if round_up(v, rem, sh, sign, rm):
                v += 1
    if sign:
        v = -v
    if v < lo or v > hi:
        return (lo if sign else hi), NV
    return v, flags


def from_int(F: Fmt, v: int, rm: int) -> tuple[int, int]:
    if v > 0:
        return round_pack(0, 0, v, F, rm)
    if v < 0:
        return round_pack(1, 0, -v, F, rm)
    return 0, 0


def convert(Fs: Fmt, Fd: Fmt, a: int, rm: int) -> tuple[int, int]:
    """Convert an encoding of format Fs to format Fd (fcvt.s.d, fcvt.d.s)."""
    am = a & Fs.mag
    if am > Fs.inf:
        return Fd.nan, (NV if is_snan(Fs, a) else 0)
    sign = a >> Fs.sign_shift
    if am == Fs.inf:
        return (sign << Fd.sign_shift) | Fd.inf, 0
    if am == 0:
        return sign << Fd.sign_shift, 0
    m, e = decode(Fs, am)
    return round_pack(sign, e, m, Fd, rm)
