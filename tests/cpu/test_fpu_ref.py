"""F and D soft-float against RISC-V hardware semantics: every operation, operand set and rounding mode.

A small C program (fpu_ref/fpu_ref.c) is compiled with the RISC-V cross
compiler and run under qemu-riscv64, whose RISC-V FPU model is exact (results,
NaN-boxing and fflags).  It executes each instruction on operands from this file
(edge cases and seeded random values with biased exponents) in each rounding
mode; the results and flags must match `pyvirt.cpu.riscv.fpu` bit for bit, and
for round-to-nearest also the integer-only path that the float fast paths fall
back on.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyvirt.cpu.riscv import fpu
from pyvirt.cpu.riscv import fpu_exact as X

# -- operand sets ---------------------------------------------------------------------------
# Register values are 64-bit: binary32 operands are NaN-boxed, except a few on
# purpose that are not (they must behave as the canonical NaN).  Random values
# have biased exponents (subnormal, near the smallest normal, around 1, near
# overflow) and significands that are random, short (few leading bits: exact
# products and halfway cases) or nearly all ones (carries).

BOX = 0xFFFFFFFF00000000
M64 = (1 << 64) - 1


@dataclass(frozen=True)
class Layout:
    ebits: int
    mbits: int

    @property
    def width(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return (1 << (self.ebits - 1)) - 1

    @property
    def emask(self) -> int:
        return (1 << self.ebits) - 1

    @property
    def mmask(self) -> int:
        return (1 << self.mbits) - 1

    @property
    def sign(self) -> int:
        return 1 << (self.width - 1)

    def make(self, sign: int, e: int, f: int) -> int:
        return (sign << (self.width - 1)) | (e << self.mbits) | (f & self.mmask)

    def reg(self, bits: int) -> int:
        """The f register value holding these bits."""
        return bits | BOX if self.width == 32 else bits

    def from_float(self, x: float) -> int:
        if self.width == 32:
            return struct.unpack("<I", struct.pack("<f", x))[0]
        return struct.unpack("<Q", struct.pack("<d", x))[0]

    def to_float(self, bits: int) -> float:
        if self.width == 32:
            return struct.unpack("<f", struct.pack("<I", bits))[0]
        return struct.unpack("<d", struct.pack("<Q", bits))[0]


S = Layout(8, 23)
D = Layout(11, 52)


def specials(F: Layout) -> list[int]:
    """Edge values of a format (raw bits), both signs."""
    m, b, top = F.mbits, F.bias, F.emask
    pos = [
        0,
        1,  # smallest subnormal
        F.mmask,  # largest subnormal
        1 << (m - 1),  # a subnormal with one bit
        F.make(0, 1, 0),  # smallest normal
        F.make(0, 1, 1),
        F.make(0, 1, F.mmask),
        F.make(0, top - 1, F.mmask),  # largest finite
        F.make(0, top - 1, 0),
        F.make(0, b, 0),  # 1
        F.make(0, b, 1),  # 1 + ulp
        F.make(0, b - 1, F.mmask),  # 1 - ulp/2
        F.make(0, b, 1 << (m - 1)),  # 1.5
        F.make(0, b - 1, 0),  # 0.5
        F.make(0, b + 1, 1 << (m - 1)),  # 3
        F.make(0, b + m, 1),  # an odd integer 2**p - 1 region
        F.make(0, b + m + 1, 0),  # 2**(p)
        F.make(0, top, 0),  # inf
        F.make(0, top, 1 << (m - 1)),  # canonical quiet NaN
        F.make(0, top, (1 << (m - 1)) | 5),  # quiet NaN with payload
        F.make(0, top, 1),  # signaling NaN
        F.make(0, top, (1 << (m - 1)) - 1),  # signaling NaN, all payload bits
    ]
    return pos + [v | F.sign for v in pos]


def rand_bits(F: Layout, rng: random.Random) -> int:
    """A random encoding with a biased exponent and significand."""
    top = F.emask
    r = rng.random()
    if r < 0.1:
        e = 0
    elif r < 0.2:
        e = rng.randint(1, 4)
    elif r < 0.5:
        e = F.bias + rng.randint(-40, 40)
    elif r < 0.6:
        e = rng.randint(top - 5, top - 1)
    elif r < 0.98:
        e = rng.randint(1, top - 1)
    else:
        e = top
    r = rng.random()
    if r < 0.5:
        f = rng.getrandbits(F.mbits)
    elif r < 0.75:
        k = rng.randint(1, F.mbits // 2 + 2)
        f = rng.getrandbits(k) << (F.mbits - k)
    elif r < 0.9:
        f = F.mmask ^ rng.getrandbits(rng.randint(1, 4))
    else:
        f = 0
    if e == 0 and r >= 0.5:
        f >>= rng.randint(0, F.mbits - 1)  # subnormals of every size
    return F.make(rng.getrandbits(1), e, f)


def rand_reg(F: Layout, rng: random.Random) -> int:
    """A random register value; for binary32 about 1 in 50 is not properly boxed."""
    bits = rand_bits(F, rng)
    if F.width == 32 and rng.random() < 0.02:
        return rng.choice([0, 0x12345678, 0xFFFFFFFE, 0x7FF80000]) << 32 | bits
    return F.reg(bits)


def with_exponent(F: Layout, bits: int, e: int) -> int:
    e = max(0, min(F.emask - 1, e))
    return (bits & ~(F.emask << F.mbits)) | (e << F.mbits)


def pairs(F: Layout, rng: random.Random, op: str, n_random: int) -> list[tuple[int, int]]:
    """Operand pairs for a two-operand op: all special pairs, random and structured ones."""
    sp = [F.reg(v) for v in specials(F)]
    out = [(a, b) for a in sp for b in sp]
    if F.width == 32:
        out += [(0x3F800000, F.reg(0x3F800000)), (F.reg(0x3F800000), 0xFFFFFFFE3F800000),
                (0x7FC00000, 0x7FF8000000000000)]
    for _ in range(n_random):
        a = rand_bits(F, rng)
        b = rand_bits(F, rng)
        k = rng.randrange(6)
        ea = (a >> F.mbits) & F.emask
        if k == 1 and op in ("add", "cmp"):
            # cancellation: b is -a give or take a few units in the last place
            b = ((a ^ F.sign) + rng.randint(-3, 3)) & (F.sign | F.sign - 1)
        elif k == 2 and op == "add":
            # b lands on a's rounding position: halfway cases and sticky bits
            b = with_exponent(F, b, ea - F.mbits - rng.randint(-1, 3))
        elif k in (1, 2) and op in ("mul", "div"):
            # result exponent near the bottom of the normal range (k=1) or near overflow
            target = 1 + rng.randint(-F.mbits - 2, 2) if k == 1 else F.emask - 1 + rng.randint(-2, 1)
            if op == "mul":
                b = with_exponent(F, b, target + F.bias - ea)
            else:
                b = with_exponent(F, b, ea + F.bias - target)
        out.append((rand_reg(F, rng) if k == 5 else F.reg(a), F.reg(b)))
    return out


def singles(F: Layout, rng: random.Random, n_random: int) -> list[int]:
    """Single operands: specials, random, and exact squares (for square root)."""
    vals = [F.reg(v) for v in specials(F)]
    for _ in range(n_random):
        if rng.random() < 0.15:
            k = (F.mbits + 1) // 2
            m = (1 << k) | rng.getrandbits(k)
            sq = m * m
            sh = sq.bit_length() - (F.mbits + 1)
            f = sq >> sh if sh >= 0 else sq << -sh
            vals.append(F.reg(F.make(0, F.bias + rng.randint(-30, 30) * 2, f)))
        else:
            vals.append(rand_reg(F, rng))
    return vals


def triples(F: Layout, rng: random.Random, n_random: int) -> list[tuple[int, int, int]]:
    """Operands for the fused multiply-adds: special mixes, cancellation, tiny and huge products."""
    sp = [F.reg(v) for v in specials(F)]
    out = [(rng.choice(sp), rng.choice(sp), rng.choice(sp)) for _ in range(n_random // 2)]
    for a in (F.reg(F.make(0, F.emask, 0)), F.reg(0)):
        for b in (F.reg(0), F.reg(F.make(1, F.emask, 0))):
            for c in sp:
                out.append((a, b, c))  # inf * 0 with any addend, quiet NaN included
    for _ in range(n_random):
        a = rand_bits(F, rng)
        b = rand_bits(F, rng)
        c = rand_bits(F, rng)
        k = rng.randrange(5)
        ea = (a >> F.mbits) & F.emask
        if k <= 1:
            # c is close to -(a*b): massive cancellation
            b = with_exponent(F, b, F.bias + rng.randint(-20, 20))
            x, y = F.to_float(a), F.to_float(b)
            prod = x * y
            if prod == prod and abs(prod) != float("inf"):
                try:
                    c = F.from_float(-prod)
                except OverflowError:
                    c = F.make(1, F.emask - 1, F.mmask)
                c = (c + rng.randint(-2, 2)) & (F.sign | F.sign - 1)
        elif k == 2:
            # product near the smallest normal, small addend
            b = with_exponent(F, b, 1 + F.bias - ea + rng.randint(-F.mbits, 2))
            c = rng.choice([0, F.sign, 1, F.sign | 1, c >> F.mbits])
        elif k == 3:
            # addend far below the product: it only contributes a sticky bit
            ec = max(0, ea - F.mbits - rng.randint(1, 30))
            c = with_exponent(F, c, ec)
        out.append((F.reg(a), F.reg(b), F.reg(c)))
    return out


def _float_neighbours(F: Layout, x: float, k: int) -> list[int]:
    try:
        bits = F.from_float(x)
    except OverflowError:
        return []
    return [(bits + d) & (F.sign | F.sign - 1) for d in range(-k, k + 1) if bits + d >= 0]


def int_conversion_inputs(F: Layout, rng: random.Random, n_random: int) -> list[int]:
    """Floating-point values around the integer-conversion boundaries."""
    vals: list[int] = []
    for bound in (2.0**31, 2.0**32, 2.0**63, 2.0**64, 2.0**24, 2.0**53):
        for sign in (1.0, -1.0):
            vals += _float_neighbours(F, sign * bound, 3)
            for d in (-1.5, -1.0, -0.5, 0.5, 1.0, 1.5):
                vals += _float_neighbours(F, sign * (bound + d), 0)
    for x in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.5, 3.5, 0.3, 0.7, 1e-30, 123456.5):
        vals += _float_neighbours(F, x, 1) + _float_neighbours(F, -x, 1)
    vals = [F.reg(v) for v in vals] + [F.reg(v) for v in specials(F)]
    for _ in range(n_random):
        if rng.random() < 0.7:
            b = with_exponent(F, rand_bits(F, rng), F.bias + rng.randint(-3, 66))
            vals.append(F.reg(b))
        else:
            vals.append(rand_reg(F, rng))
    return vals


def int_inputs(rng: random.Random, n_random: int) -> list[int]:
    """Integer register values for fcvt.{s,d}.{w,wu,l,lu}: boundaries, ties, garbage upper halves."""
    vals = {0, 1, M64, 1 << 63, (1 << 63) - 1, 0x80000000, 0x7FFFFFFF, 0xFFFFFFFF,
            0xFFFFFFFF80000000, 0x123456789ABCDEF0}
    for k in range(65):
        for d in (-3, -1, 0, 1, 3):
            vals.add(((1 << k) + d) & M64)
            vals.add((-(1 << k) + d) & M64)
    for p in (24, 53):  # halfway cases for binary32 and binary64
        for k in range(p, 64):
            vals.add((1 << k) | (1 << (k - p)))
            vals.add((1 << k) | (3 << (k - p)))
            vals.add(-((1 << k) | (1 << (k - p))) & M64)
    out = sorted(vals)
    for _ in range(n_random):
        bl = rng.randint(1, 64)
        out.append(rng.getrandbits(bl) | (1 << (bl - 1)))
        out.append(rng.getrandbits(64))
    return out


def narrowing_inputs(rng: random.Random, n_random: int) -> list[int]:
    """binary64 values for fcvt.s.d: the binary32 range edges, subnormals and halfway cases."""
    vals = list(specials(D))
    for x in (3.4028234663852886e38, 3.4028235677973366e38, 1.1754943508222875e-38, 1.401298464324817e-45,
              7.006492321624085e-46, 2.0**-150, 2.0**-126 * (1 - 2.0**-25), 2.0**-126 * (1 - 2.0**-24)):
        vals += _float_neighbours(D, x, 2) + _float_neighbours(D, -x, 2)
    for _ in range(n_random):
        e = D.bias + rng.randint(-155, 130)
        r = rng.random()
        if r < 0.3:
            f = (rng.getrandbits(23) << 29) | (1 << 28)  # exactly halfway between binary32 values
        elif r < 0.5:
            f = rng.getrandbits(23) << 29  # exactly representable
        else:
            f = rng.getrandbits(52)
        vals.append(D.make(rng.getrandbits(1), e, f))
    return vals


# -- the reference ------------------------------------------------------------------------

REF_SOURCE = Path(__file__).parent / "fpu_ref" / "fpu_ref.c"
CC = "riscv64-linux-gnu-gcc"
QEMU = "qemu-riscv64"
SEED = 20240611
N_RANDOM = 1200
RMS = (0, 1, 2, 3, 4)


def _operand_sets() -> dict[str, list[tuple[int, ...]]]:
    rng = random.Random(SEED)
    sets: dict[str, list[tuple[int, ...]]] = {}
    for sfx, F in (("s", S), ("d", D)):
        for op in ("add", "mul", "div", "cmp"):
            sets[f"{op}_{sfx}"] = pairs(F, rng, op, N_RANDOM)
        sets[f"one_{sfx}"] = [(v,) for v in singles(F, rng, N_RANDOM)]
        sets[f"fma_{sfx}"] = triples(F, rng, N_RANDOM)
        sets[f"toint_{sfx}"] = [(v,) for v in int_conversion_inputs(F, rng, N_RANDOM)]
    sets["int"] = [(v,) for v in int_inputs(rng, N_RANDOM // 2)]
    sets["narrow"] = [(v,) for v in narrowing_inputs(rng, N_RANDOM)]
    return sets


def _op_table() -> dict[str, tuple[str, bool, str]]:
    """name -> (calling convention, takes a rounding mode, operand set)."""
    t: dict[str, tuple[str, bool, str]] = {}
    for s in ("s", "d"):
        t[f"fadd_{s}"] = ("2", True, f"add_{s}")
        t[f"fsub_{s}"] = ("2", True, f"add_{s}")
        t[f"fmul_{s}"] = ("2", True, f"mul_{s}")
        t[f"fdiv_{s}"] = ("2", True, f"div_{s}")
        t[f"fsqrt_{s}"] = ("1", True, f"one_{s}")
        for op in ("fmadd", "fmsub", "fnmsub", "fnmadd"):
            t[f"{op}_{s}"] = ("3", True, f"fma_{s}")
        for op in ("fmin", "fmax", "feq", "flt", "fle"):
            t[f"{op}_{s}"] = ("2", False, f"cmp_{s}")
        for op in ("fsgnj", "fsgnjn", "fsgnjx"):
            t[f"{op}_{s}"] = ("2nf", False, f"cmp_{s}")
        t[f"fclass_{s}"] = ("1nf", False, f"one_{s}")
        for it in ("w", "wu", "l", "lu"):
            t[f"fcvt_{it}_{s}"] = ("1", True, f"toint_{s}")
            t[f"fcvt_{s}_{it}"] = ("1", True, "int")
    t["fcvt_s_d"] = ("1", True, "narrow")
    t["fcvt_d_s"] = ("1", True, "one_s")
    return t


OPS = _op_table()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, ...]]]:
    """Every operation on every operand set and rounding mode, run by qemu-riscv64.

    Returns name -> [(rm, a, b, c, result, fflags), ...].
    """
    missing = [tool for tool in (CC, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: gcc-riscv64-linux-gnu, qemu-user)")
    exe = tmp_path_factory.mktemp("fpu_ref") / "fpu_ref"
    subprocess.run([CC, "-static", "-O2", "-Wall", "-o", str(exe), str(REF_SOURCE)], check=True,
                   capture_output=True, timeout=120)
    names = subprocess.run([QEMU, str(exe), "list"], check=True, capture_output=True, text=True,
                           timeout=60).stdout.split()
    assert sorted(names) == sorted(OPS), "fpu_ref.c and the test's op table disagree"
    sets = _operand_sets()
    records = array("Q")
    index: list[tuple[str, int, tuple[int, ...]]] = []
    for op_index, name in enumerate(names):
        _, rounding, set_name = OPS[name]
        for rm in RMS if rounding else (0,):
            for operands in sets[set_name]:
                a, b, c = (*operands, 0, 0)[:3]
                records.extend((op_index, rm, a, b, c))
                index.append((name, rm, operands))
    if sys.byteorder != "little":
        records.byteswap()
    run = subprocess.run([QEMU, str(exe)], input=records.tobytes(), capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    results = array("Q")
    results.frombytes(run.stdout)
    if sys.byteorder != "little":
        results.byteswap()
    assert len(results) == 2 * len(index)
    by_op: dict[str, list[tuple[int, ...]]] = {name: [] for name in names}
    for i, (name, rm, operands) in enumerate(index):
        a, b, c = (*operands, 0, 0)[:3]
        by_op[name].append((rm, a, b, c, results[2 * i], results[2 * i + 1]))
    return by_op


def _call(fn: Callable[..., Any], conv: str, rounding: bool, rm: int, a: int, b: int, c: int) -> tuple[int, int]:
    if conv == "2":
        return fn(a, b, rm) if rounding else fn(a, b)
    if conv == "1":
        return fn(a, rm)
    if conv == "3":
        return fn(a, b, c, rm)
    if conv == "2nf":
        return fn(a, b), 0
    return fn(a), 0  # "1nf"


def _unbox(v: int) -> int:
    return fpu.unbox_s(v)


def _box(r: tuple[int, int]) -> tuple[int, int]:
    return r[0] | fpu.BOX, r[1]


def _same(v: Any) -> Any:
    return v


def _exact_paths() -> dict[str, Callable[..., tuple[int, int]]]:
    """The integer-only implementation of each operation that has a float fast path."""
    paths: dict[str, Callable[..., tuple[int, int]]] = {}

    def arith(f: Callable[..., tuple[int, int]], F: X.Fmt, un: Any, wrap: Any) -> Callable[..., tuple[int, int]]:
        return lambda *ops: wrap(f(F, *[un(v) for v in ops[:-1]], ops[-1]))

    def fma(F: X.Fmt, un: Any, wrap: Any, neg_prod: int, neg_add: int) -> Callable[..., tuple[int, int]]:
        return lambda a, b, c, rm: wrap(X.fma(F, un(a), un(b), un(c), rm, neg_prod, neg_add))

    def minmax(F: X.Fmt, un: Any, wrap: Any, is_max: bool) -> Callable[..., tuple[int, int]]:
        return lambda a, b, _rm: wrap(X.minmax(F, un(a), un(b), is_max))

    def compare(F: X.Fmt, un: Any, code: int) -> Callable[..., tuple[int, int]]:
        return lambda a, b, _rm: X.compare(F, un(a), un(b), code)

    def to_int(F: X.Fmt, un: Any, conv: Any) -> Callable[..., tuple[int, int]]:
        return lambda a, rm: conv(F, un(a), rm)

    def from_int(F: X.Fmt, wrap: Any, ext: Any) -> Callable[..., tuple[int, int]]:
        return lambda x, rm: wrap(X.from_int(F, ext(x), rm))

    for s, F, un, wrap in (("s", X.S, _unbox, _box), ("d", X.D, _same, _same)):
        for op, f in (("fadd", X.add), ("fsub", X.sub), ("fmul", X.mul), ("fdiv", X.div), ("fsqrt", X.sqrt)):
            paths[f"{op}_{s}"] = arith(f, F, un, wrap)
        for op, neg_prod, neg_add in (("fmadd", 0, 0), ("fmsub", 0, 1), ("fnmsub", 1, 0), ("fnmadd", 1, 1)):
            paths[f"{op}_{s}"] = fma(F, un, wrap, neg_prod, neg_add)
        paths[f"fmin_{s}"] = minmax(F, un, wrap, False)
        paths[f"fmax_{s}"] = minmax(F, un, wrap, True)
        for op, code in (("feq", 0), ("flt", 1), ("fle", 2)):
            paths[f"{op}_{s}"] = compare(F, un, code)
        for it, conv in (("w", fpu._to_w), ("wu", fpu._to_wu), ("l", fpu._to_l), ("lu", fpu._to_lu)):
            paths[f"fcvt_{it}_{s}"] = to_int(F, un, conv)
        for it, ext in (("w", fpu._w), ("wu", lambda x: x & 0xFFFFFFFF), ("l", fpu._l), ("lu", _same)):
            paths[f"fcvt_{s}_{it}"] = from_int(F, wrap, ext)
    paths["fcvt_s_d"] = lambda a, rm: _box(X.convert(X.D, X.S, a, rm))
    paths["fcvt_d_s"] = lambda a, rm: X.convert(X.S, X.D, fpu.unbox_s(a), rm)
    return paths


EXACT = _exact_paths()


def _fmt(rm: int, a: int, b: int, c: int, got: Any, want: Any, conv: str) -> str:
    ops = {"1": [a], "1nf": [a], "2": [a, b], "2nf": [a, b], "3": [a, b, c]}[conv]
    return f"rm={rm} ops=({', '.join(f'{v:#018x}' for v in ops)}) got={got} want={want}"


@pytest.mark.parametrize("name", sorted(OPS))
def test_matches_riscv_hardware_semantics(name: str, reference: dict[str, list[tuple[int, ...]]]) -> None:
    conv, rounding, _ = OPS[name]
    fn = getattr(fpu, name)
    exact = EXACT.get(name)
    bad: list[str] = []
    checked = 0
    for rm, a, b, c, want_r, want_fl in reference[name]:
        got = _call(fn, conv, rounding, rm, a, b, c)
        want = (want_r, want_fl)
        if got != want:
            bad.append(_fmt(rm, a, b, c, (hex(got[0]), got[1]), (hex(want_r), want_fl), conv))
        if exact is not None and rm == 0:
            args = {"1": (a, rm), "2": (a, b, rm), "3": (a, b, c, rm)}[conv]
            got_exact = exact(*args)
            if got_exact != want:
                bad.append("exact path: " + _fmt(rm, a, b, c, (hex(got_exact[0]), got_exact[1]),
                                                 (hex(want_r), want_fl), conv))
        checked += 1
    assert checked > 200
    assert not bad, f"{len(bad)} of {checked} differ, first ones:\n" + "\n".join(bad[:12])
