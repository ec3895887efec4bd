"""Assembly generators shared by the CPU instruction tests.

The table loops run one instruction over every pair (or every element) of a
value table held in memory and store each result into ``__buf``, so a
single program checks an operation on hundreds of operand combinations and
the final dump of ``__buf`` carries every result.  Being loops, they also
exercise the translators' in-block loops (jit hot=1) and promotion of a
running block (jit hot=2).

Register use inside the loops: s0 = table, s1 = result pointer, s2/s3 =
indices, t2 = limit, a0/a1 = operands, a2 = result.
"""

from __future__ import annotations

M64 = (1 << 64) - 1

# 64-bit operands with every interesting sign/width boundary.
VALUES = [
    0, 1, 2, 3, -1, -2, 7, -7,
    0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x1_0000_0000, -0x80000000, -0x80000001,
    0x7FFFFFFFFFFFFFFF, -0x8000000000000000, -0x7FFFFFFFFFFFFFFF,
    31, 32, 33, 63, 64, 65,
    0x0123_4567_89AB_CDEF, -0x0123_4567_89AB_CDEF, 0xFFFF_FFFF_8000_0000, 0x0000_0001_7FFF_FFFF,
    0x5555_5555_5555_5555, 0xAAAA_AAAA_AAAA_AAAA, 0x8000_0000_0000_0001,
]

# 12-bit immediates with their boundaries.
IMMEDIATES = [0, 1, -1, 2047, -2048, 0x555, -0x556, 31, 32, 63, 64, 0x7FF & ~1, -2]


def table(name: str, values: list[int]) -> str:
    """A .data table of 64-bit words named `name`."""
    words = [v & M64 for v in values]
    lines = [f"    .balign 8\n{name}:"]
    for i in range(0, len(words), 4):
        lines.append("    .dword " + ", ".join(hex(w) for w in words[i:i + 4]))
    return "\n".join(lines)


def results_start() -> str:
    return "    la s1, __buf\n"


def pair_loop(op_lines: str, n: int, tbl: str = "__vals") -> str:
    """Run `op_lines` (reading a0, a1; result in a2) over every pair of `tbl`'s `n` values."""
    return f"""
    la s0, {tbl}
    li t2, {8 * n}
    li s2, 0
1:  li s3, 0
2:  add t0, s0, s2
    ld a0, 0(t0)
    add t1, s0, s3
    ld a1, 0(t1)
{op_lines}
    sd a2, 0(s1)
    addi s1, s1, 8
    addi s3, s3, 8
    bltu s3, t2, 2b
    addi s2, s2, 8
    bltu s2, t2, 1b
"""


def single_loop(op_lines: str, n: int, tbl: str = "__vals") -> str:
    """Run `op_lines` (reading a0; result in a2) over each of `tbl`'s `n` values."""
    return f"""
    la s0, {tbl}
    li t2, {8 * n}
    li s2, 0
1:  add t0, s0, s2
    ld a0, 0(t0)
{op_lines}
    sd a2, 0(s1)
    addi s1, s1, 8
    addi s2, s2, 8
    bltu s2, t2, 1b
"""


def binops(ops: list[str], n: int) -> str:
    """`op a2, a0, a1` for every op over every pair."""
    return results_start() + "".join(pair_loop(f"    {op} a2, a0, a1", n) for op in ops)


def result_words(ops_pairs: int) -> int:
    """Bytes of ``__buf`` that `ops_pairs` stored results need, rounded up to pages."""
    return -(-ops_pairs * 8 // 4096) * 4096
