"""Property tests for the soft-float: independent oracles, no reference binary needed.

* the float fast paths (round-to-nearest) agree with the integer-only path;
* round-to-nearest results agree with the host's IEEE binary64 arithmetic;
* in every rounding mode the result brackets the exact rational value: RDN and
  RUP are equal (exact, no NX) or adjacent, RTZ/RNE/RMM pick the right one;
* conversions agree with Python's integer and float conversions;
* NaN-boxing: an improperly boxed operand is the canonical NaN.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirt.cpu.riscv import fpu
from pyvirt.cpu.riscv import fpu_exact as X

M64 = (1 << 64) - 1
BOX = 0xFFFFFFFF00000000
RNE, RTZ, RDN, RUP, RMM = range(5)
NV, DZ, OF, UF, NX = 16, 8, 4, 2, 1

PROPS = settings(max_examples=250, deadline=None)


def _encodings(width: int) -> st.SearchStrategy[int]:
    """Raw encodings biased towards the interesting ones."""
    ebits, mbits = (8, 23) if width == 32 else (11, 52)
    top = (1 << ebits) - 1
    bias = top >> 1
    exponent = st.one_of(
        st.integers(0, top),
        st.sampled_from([0, 1, 2, top - 1, top, bias, bias - 1, bias + 1]),
        st.integers(bias - 40, bias + 40),
    )
    fraction = st.one_of(
        st.integers(0, (1 << mbits) - 1),
        st.integers(0, 12).map(lambda k: ((1 << k) - 1) << (mbits - k)),  # short significands
        st.integers(0, 6).map(lambda k: (1 << mbits) - 1 - k),
        st.sampled_from([0, 1, 1 << (mbits - 1)]),
    )
    built = st.builds(lambda s, e, f: (s << (width - 1)) | (e << mbits) | f, st.integers(0, 1), exponent, fraction)
    return st.one_of(built, st.integers(0, (1 << width) - 1))


DOUBLES = _encodings(64)
SINGLES = _encodings(32).map(lambda b: b | BOX)  # NaN-boxed registers
RMS = st.integers(0, 4)


def _f64(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _b64(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


# -- fast path == exact path ----------------------------------------------------------------

def _fast_vs_exact(fast: Callable[..., tuple[int, int]], exact: Callable[..., tuple[int, int]],
                   *ops: int) -> None:
    assert fast(*ops, RNE) == exact(*ops, RNE)


@PROPS
@given(DOUBLES, DOUBLES)
def test_double_fast_paths_agree_with_exact_path(a: int, b: int) -> None:
    D = X.D
    _fast_vs_exact(fpu.fadd_d, lambda a, b, rm: X.add(D, a, b, rm), a, b)
    _fast_vs_exact(fpu.fsub_d, lambda a, b, rm: X.sub(D, a, b, rm), a, b)
    _fast_vs_exact(fpu.fmul_d, lambda a, b, rm: X.mul(D, a, b, rm), a, b)
    _fast_vs_exact(fpu.fdiv_d, lambda a, b, rm: X.div(D, a, b, rm), a, b)
    _fast_vs_exact(fpu.fsqrt_d, lambda a, rm: X.sqrt(D, a, rm), a)
    _fast_vs_exact(fpu.fcvt_s_d, lambda a, rm: fpu._ret_s(X.convert(D, X.S, a, rm)), a)
    for rm in range(5):
        assert fpu.fcvt_w_d(a, rm) == fpu._to_w(D, a, rm)
        assert fpu.fcvt_lu_d(a, rm) == fpu._to_lu(D, a, rm)
    assert fpu.feq_d(a, b) == X.compare(D, a, b, 0)
    assert fpu.flt_d(a, b) == X.compare(D, a, b, 1)
    assert fpu.fle_d(a, b) == X.compare(D, a, b, 2)
    assert fpu.fmin_d(a, b) == X.minmax(D, a, b, False)
    assert fpu.fmax_d(a, b) == X.minmax(D, a, b, True)


@PROPS
@given(SINGLES, SINGLES)
def test_single_fast_paths_agree_with_exact_path(a: int, b: int) -> None:
    S, un = X.S, fpu.unbox_s

    def boxed(f: Callable[..., tuple[int, int]]) -> Callable[..., tuple[int, int]]:
        return lambda *ops: fpu._ret_s(f(S, *[un(v) for v in ops[:-1]], ops[-1]))

    _fast_vs_exact(fpu.fadd_s, boxed(X.add), a, b)
    _fast_vs_exact(fpu.fsub_s, boxed(X.sub), a, b)
    _fast_vs_exact(fpu.fmul_s, boxed(X.mul), a, b)
    _fast_vs_exact(fpu.fdiv_s, boxed(X.div), a, b)
    _fast_vs_exact(fpu.fsqrt_s, boxed(X.sqrt), a)
    assert fpu.fcvt_d_s(a, RNE) == X.convert(S, X.D, un(a), RNE)
    for rm in range(5):
        assert fpu.fcvt_l_s(a, rm) == fpu._to_l(S, un(a), rm)
        assert fpu.fcvt_wu_s(a, rm) == fpu._to_wu(S, un(a), rm)
    assert fpu.flt_s(a, b) == X.compare(S, un(a), un(b), 1)
    assert fpu.fmax_s(a, b) == fpu._ret_s(X.minmax(S, un(a), un(b), True))


@PROPS
@given(st.integers(0, M64), RMS)
def test_int_to_float_fast_paths_agree_with_exact_path(x: int, rm: int) -> None:
    for name, v in (("w", fpu._w(x)), ("wu", x & 0xFFFFFFFF), ("l", fpu._l(x)), ("lu", x)):
        assert getattr(fpu, f"fcvt_d_{name}")(x, rm) == X.from_int(X.D, v, rm)
        assert getattr(fpu, f"fcvt_s_{name}")(x, rm) == fpu._ret_s(X.from_int(X.S, v, rm))


@PROPS
@given(DOUBLES, DOUBLES, DOUBLES)
def test_fused_multiply_add_fast_paths_agree_with_exact_path(a: int, b: int, c: int) -> None:
    sa, sb, sc = (fpu.box_s(v & 0xFFFFFFFF) for v in (a, b, c))
    for name, neg_prod, neg_add in (("fmadd", 0, 0), ("fmsub", 0, 1), ("fnmsub", 1, 0), ("fnmadd", 1, 1)):
        assert getattr(fpu, f"{name}_d")(a, b, c, RNE) == X.fma(X.D, a, b, c, RNE, neg_prod, neg_add)
        want = fpu._ret_s(X.fma(X.S, sa & 0xFFFFFFFF, sb & 0xFFFFFFFF, sc & 0xFFFFFFFF, RNE, neg_prod, neg_add))
        assert getattr(fpu, f"{name}_s")(sa, sb, sc, RNE) == want


@PROPS
@given(DOUBLES, DOUBLES)
def test_fused_multiply_add_cancellation_agrees_with_exact_path(a: int, b: int) -> None:
    """c close to -(a*b): the hard case for a fused multiply-add."""
    p = _f64(a) * _f64(b)
    if not math.isfinite(p):
        return
    for delta in (-1, 0, 1):
        c = (_b64(p) + delta) & M64
        assert fpu.fmsub_d(a, b, c, RNE) == X.fma(X.D, a, b, c, RNE, 0, 1)
    sa, sb = fpu.box_s(a & 0xFFFFFFFF), fpu.box_s(b & 0xFFFFFFFF)
    ps = _f64(fpu.fcvt_d_s(sa, RNE)[0]) * _f64(fpu.fcvt_d_s(sb, RNE)[0])
    if math.isfinite(ps) and abs(ps) < 3.4e38:
        cs = struct.unpack("<I", struct.pack("<f", ps))[0]
        for delta in (-1, 0, 1):
            c = fpu.box_s((cs + delta) & 0xFFFFFFFF)
            want = fpu._ret_s(X.fma(X.S, sa & 0xFFFFFFFF, sb & 0xFFFFFFFF, c & 0xFFFFFFFF, RNE, 0, 1))
            assert fpu.fmsub_s(sa, sb, c, RNE) == want


# -- the exact path against the host's binary64 arithmetic -----------------------------------

@PROPS
@given(DOUBLES, DOUBLES)
def test_exact_path_round_to_nearest_matches_host_binary64(a: int, b: int) -> None:
    x, y = _f64(a), _f64(b)
    D = X.D
    cases = [(X.add(D, a, b, RNE), x + y), (X.sub(D, a, b, RNE), x - y), (X.mul(D, a, b, RNE), x * y)]
    if y != 0:
        cases.append((X.div(D, a, b, RNE), x / y))
    if x >= 0 or math.isnan(x):
        cases.append((X.sqrt(D, a, RNE), math.sqrt(x)))
    for (bits, _flags), host in cases:
        if math.isnan(host):
            assert bits == fpu.CANONICAL_NAN_D
        else:
            assert bits == _b64(host)


# -- every rounding mode against exact rationals ----------------------------------------------

def _value(F: X.Fmt, bits: int) -> Fraction:
    m, e = X.decode(F, bits & F.mag)
    v = Fraction(m) * Fraction(2) ** e
    return -v if bits & F.sign else v


def _order(F: X.Fmt, bits: int) -> int:
    return bits if not bits & F.sign else -(bits & F.mag) - 1


def _check_rounding(F: X.Fmt, exact: Fraction, results: list[tuple[int, int]]) -> None:
    """results[rm] for rm 0..4 of an operation whose exact value is `exact` (nonzero)."""
    if any((r & F.mag) >= F.inf for r, _ in results):
        return  # overflow: covered by the hardware reference
    lo, hi = results[RDN][0], results[RUP][0]
    vlo, vhi = _value(F, lo), _value(F, hi)
    assert vlo <= exact <= vhi
    if vlo == vhi:
        assert exact == vlo
        assert all(_value(F, r) == exact and not fl & NX for r, fl in results)
        return
    assert _order(F, hi) == _order(F, lo) + 1  # adjacent encodings: nothing in between
    assert all(fl & NX for _, fl in results)
    toward_zero = lo if exact > 0 else hi
    away = hi if exact > 0 else lo
    assert results[RTZ][0] == toward_zero
    dlo, dhi = exact - vlo, vhi - exact
    if dlo != dhi:
        nearest = lo if dlo < dhi else hi
        assert results[RNE][0] == nearest
        assert results[RMM][0] == nearest
    else:
        assert results[RNE][0] == (lo if not (lo & 1) else hi)  # ties to the even significand
        assert results[RMM][0] == away


def _finite_nonzero(F: X.Fmt, *ops: int) -> bool:
    return all(0 < (v & F.mag) < F.inf for v in ops)


@PROPS
@given(DOUBLES, DOUBLES, DOUBLES)
def test_double_rounding_modes_bracket_the_exact_value(a: int, b: int, c: int) -> None:
    D = X.D
    if not _finite_nonzero(D, a, b, c):
        return
    va, vb, vc = _value(D, a), _value(D, b), _value(D, c)
    for exact, op in (
        (va + vb, lambda rm: fpu.fadd_d(a, b, rm)),
        (va * vb, lambda rm: fpu.fmul_d(a, b, rm)),
        (va / vb, lambda rm: fpu.fdiv_d(a, b, rm)),
        (va * vb + vc, lambda rm: fpu.fmadd_d(a, b, c, rm)),
        (-(va * vb) + vc, lambda rm: fpu.fnmsub_d(a, b, c, rm)),
        (Fraction(fpu._l(a & M64)), lambda rm: fpu.fcvt_d_l(a, rm)),
    ):
        if exact:
            _check_rounding(D, exact, [op(rm) for rm in range(5)])


@PROPS
@given(SINGLES, SINGLES, SINGLES)
def test_single_rounding_modes_bracket_the_exact_value(a: int, b: int, c: int) -> None:
    S = X.S
    ua, ub, uc = fpu.unbox_s(a), fpu.unbox_s(b), fpu.unbox_s(c)
    if not _finite_nonzero(S, ua, ub, uc):
        return
    va, vb, vc = _value(S, ua), _value(S, ub), _value(S, uc)

    def unboxed(op: Callable[[int], tuple[int, int]]) -> Callable[[int], tuple[int, int]]:
        def run(rm: int) -> tuple[int, int]:
            r, fl = op(rm)
            assert r >> 32 == 0xFFFFFFFF, "single results are NaN-boxed"
            return r & 0xFFFFFFFF, fl
        return run

    for exact, op in (
        (va - vb, lambda rm: fpu.fsub_s(a, b, rm)),
        (va * vb, lambda rm: fpu.fmul_s(a, b, rm)),
        (va / vb, lambda rm: fpu.fdiv_s(a, b, rm)),
        (va * vb - vc, lambda rm: fpu.fmsub_s(a, b, c, rm)),
        (-(va * vb) - vc, lambda rm: fpu.fnmadd_s(a, b, c, rm)),
    ):
        if exact:
            _check_rounding(S, exact, [unboxed(op)(rm) for rm in range(5)])


@PROPS
@given(DOUBLES)
def test_sqrt_brackets_the_exact_root(a: int) -> None:
    D = X.D
    if not 0 < a < D.inf:
        return
    v = _value(D, a)
    lo, hi = fpu.fsqrt_d(a, RDN)[0], fpu.fsqrt_d(a, RUP)[0]
    assert _value(D, lo) ** 2 <= v <= _value(D, hi) ** 2
    assert hi - lo in (0, 1)
    assert (hi == lo) == (_value(D, lo) ** 2 == v)


# -- conversions -------------------------------------------------------------------------------

@PROPS
@given(st.floats(allow_nan=False, allow_infinity=False), RMS)
def test_double_to_int_matches_python(x: float, rm: int) -> None:
    exact = Fraction(x)
    rounders = {RTZ: int, RDN: math.floor, RUP: math.ceil, RNE: round,
                RMM: lambda f: int(math.floor(abs(f) + Fraction(1, 2))) * (1 if f >= 0 else -1)}
    i = rounders[rm](exact)
    r, fl = fpu.fcvt_l_d(_b64(x), rm)
    if -(1 << 63) <= i < 1 << 63:
        assert r == i & M64
        assert fl == (NX if i != exact else 0)
    else:
        assert fl == NV
        assert r == ((1 << 63) if x < 0 else (1 << 63) - 1)
    r, fl = fpu.fcvt_wu_d(_b64(x), rm)
    if 0 <= i <= 0xFFFFFFFF:
        assert r == (i if i < 1 << 31 else i | BOX)  # sign-extended from 32 bits
    else:
        assert (r, fl) == ((0 if x < 0 else M64), NV)


@PROPS
@given(st.floats(width=32, allow_nan=False))
def test_single_double_round_trip_is_exact(x: float) -> None:
    s = struct.unpack("<I", struct.pack("<f", x))[0] | BOX
    d, fl = fpu.fcvt_d_s(s, RNE)
    assert (_f64(d), fl) == (x, 0)
    assert fpu.fcvt_s_d(d, RUP) == (s, 0)


def test_nan_results_are_canonical_and_snan_raises_nv() -> None:
    snan_d, snan_s = 0x7FF0000000000001, 0x7F800001 | BOX
    qnan_payload_d = 0xFFF8000000001234
    assert fpu.fadd_d(snan_d, _b64(1.0), RNE) == (fpu.CANONICAL_NAN_D, NV)
    assert fpu.fmul_d(qnan_payload_d, _b64(2.0), RNE) == (fpu.CANONICAL_NAN_D, 0)
    assert fpu.fadd_s(snan_s, 0x3F800000 | BOX, RNE) == (0x7FC00000 | BOX, NV)
    assert fpu.fcvt_d_s(snan_s, RNE) == (fpu.CANONICAL_NAN_D, NV)
    assert fpu.fcvt_s_d(qnan_payload_d, RNE) == (0x7FC00000 | BOX, 0)
    # inf * 0 is invalid even with a quiet NaN addend
    assert fpu.fmadd_d(_b64(math.inf), 0, fpu.CANONICAL_NAN_D, RNE) == (fpu.CANONICAL_NAN_D, NV)
    assert fpu.fdiv_d(_b64(1.0), 0, RNE) == (_b64(math.inf), DZ)
    assert fpu.fcvt_w_d(qnan_payload_d, RTZ) == ((1 << 31) - 1, NV)


@PROPS
@given(st.integers(0, M64), SINGLES, RMS)
def test_improperly_boxed_single_is_the_canonical_nan(bad: int, good: int, rm: int) -> None:
    if bad >> 32 == 0xFFFFFFFF:
        bad &= 0xFFFFFFFF  # upper half all zeros: never properly boxed
    cnan = 0x7FC00000 | BOX
    nv = NV if fpu.fclass_s(good) == 256 else 0  # a signaling NaN partner still raises NV
    assert fpu.unbox_s(bad) == 0x7FC00000
    assert fpu.fclass_s(bad) == 512  # quiet NaN
    assert fpu.fadd_s(bad, good, rm) == (cnan, nv)
    assert fpu.fmul_s(good, bad, rm) == (cnan, nv)
    assert fpu.fsqrt_s(bad, rm) == (cnan, 0)
    assert fpu.fcvt_d_s(bad, rm) == (fpu.CANONICAL_NAN_D, 0)
    assert fpu.fcvt_w_s(bad, rm) == ((1 << 31) - 1, NV)
    assert fpu.feq_s(bad, good) == (0, nv)
    assert fpu.flt_s(bad, good) == (0, NV)
    assert fpu.fsgnj_s(bad, good) == (0x7FC00000 | (good & 0x80000000)) | BOX
    if fpu.fclass_s(good) < 256:
        assert fpu.fmin_s(bad, good) == (good, 0)


@PROPS
@given(DOUBLES)
def test_fclass_sets_exactly_one_bit_matching_the_value(a: int) -> None:
    mask = fpu.fclass_d(a)
    assert mask and mask & (mask - 1) == 0 and mask < 1 << 10
    x = _f64(a)
    if math.isnan(x):
        assert mask in (256, 512)
    elif math.isinf(x):
        assert mask == (1 if x < 0 else 128)
    elif x == 0:
        assert mask == (8 if math.copysign(1, x) < 0 else 16)
    else:
        normal = abs(x) >= 2.0**-1022
        assert mask == {(True, True): 2, (True, False): 4, (False, False): 32, (False, True): 64}[(x < 0, normal)]
