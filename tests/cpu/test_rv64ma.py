"""M and A extensions on every engine against qemu-riscv64.

M: every multiply/divide over a table of edge operands (division by zero, signed
overflow, W forms with junk in the upper half).  A: LR/SC success and failure,
every AMO in .w and .d over edge memory/operand pairs, aq/rl forms, register
aliasing; a misaligned AMO faults (see test_faults.py).
"""

from __future__ import annotations

from cpu_gen import VALUES, binops, pair_loop, result_words, results_start, table

from pyvirt.testing import asm

N = len(VALUES)
DATA = table("__vals", VALUES)

M_OPS = ["mul", "mulh", "mulhsu", "mulhu", "div", "divu", "rem", "remu",
         "mulw", "divw", "divuw", "remw", "remuw"]
AMOS = ["amoswap", "amoadd", "amoxor", "amoand", "amoor", "amomin", "amomax", "amominu", "amomaxu"]


def test_multiply_divide_table(check_user) -> None:
    size = result_words(len(M_OPS) * N * N)
    check_user(asm.user_program(binops(M_OPS, N), seed=21, bufsize=size, data=DATA), bufsize=size)


def test_multiply_divide_special_cases(check_user) -> None:
    body = """
    .option norvc
    li a0, -0x8000000000000000
    li a1, -1
    div t0, a0, a1            # overflow: quotient = dividend
    rem t1, a0, a1            # overflow: remainder 0
    divu t2, a0, a1
    remu t3, a0, a1
    div t4, a0, x0            # by zero: all ones
    divu t5, a0, x0
    rem t6, a0, x0            # by zero: the dividend
    remu s2, a0, x0
    li a2, 0x123456780000000
    li a3, 0xFFFFFFFF80000000 # -2^31 as a W operand
    li a4, 0xABCDEF00FFFFFFFF # -1 in the low word, junk above
    divw s3, a3, a4           # W overflow
    remw s4, a3, a4
    divuw s5, a3, a4
    remuw s6, a3, a4
    divw s7, a3, a2           # W divide by zero (low word 0)
    remw s8, a3, a2
    divuw s9, a4, a2
    remuw s10, a4, a2
    mulw s11, a4, a4
    mul a5, a5, a5            # rd == rs1 == rs2
    mulh a6, a6, a6
    mulhsu a7, a7, a7
    div ra, ra, ra
    div a0, a0, a0
    """
    check_user(asm.user_program(body, seed=22))


def _amo_table(width: str) -> str:
    lines = []
    for op in AMOS:
        lines.append(pair_loop(f"""
    la t3, __scratch
    sd a0, 0(t3)
    {op}.{width} a2, a1, (t3)
    ld a3, 0(t3)
    sd a3, 0(s1)
    addi s1, s1, 8""", N))
    return results_start() + "".join(lines)


def test_amo_word_table(check_user) -> None:
    size = result_words(len(AMOS) * N * N * 2)
    prog = asm.user_program(_amo_table("w"), seed=23, bufsize=size,
                            data=DATA + "\n    .balign 8\n__scratch: .dword 0, 0")
    check_user(prog, bufsize=size)


def test_amo_doubleword_table(check_user) -> None:
    size = result_words(len(AMOS) * N * N * 2)
    prog = asm.user_program(_amo_table("d"), seed=24, bufsize=size,
                            data=DATA + "\n    .balign 8\n__scratch: .dword 0, 0")
    check_user(prog, bufsize=size)


def test_amo_aliasing_and_ordering_bits(check_user) -> None:
    body = """
    .option norvc
    la s2, __buf + 256
    li t0, 0x7FFFFFFF
    sw t0, 0(s2)
    li t1, 1
    amoadd.w.aq x0, t1, (s2)          # rd = x0: memory still updated
    amoadd.w.rl t1, t1, (s2)          # rd == rs2
    amoswap.w.aqrl t2, t1, (s2)
    la s3, __buf + 512
    mv t3, s3
    amoor.d t3, t3, (t3)              # rd == rs1 == rs2: old value, address stored
    amomax.d.aq s4, s3, (s3)
    amominu.d.rl s5, x0, (s3)         # source x0
    li t4, -1
    amomaxu.w s6, t4, (s2)
    amomin.w s7, t4, (s2)
    la s8, __buf + 4092               # the last word of a page
    amoxor.w s9, t4, (s8)
    la s10, __buf + 4088              # the last doubleword of a page
    amoand.d s11, t0, (s10)
    """
    check_user(asm.user_program(body, seed=25))


def test_lr_sc(check_user) -> None:
    body = """
    .option norvc
    la s2, __buf + 128
    li t0, 0x1111222233334444
    sd t0, 0(s2)
    lr.d a0, (s2)
    addi a0, a0, 1
    sc.d a1, a0, (s2)                 # succeeds: 0
    ld a2, 0(s2)
    sc.d a3, t0, (s2)                 # no reservation any more: fails, memory unchanged
    ld a4, 0(s2)
    sc.w a5, t0, (s2)                 # fails too
    li t1, 0xFFFFFFFF8000FFFF
    sw t1, 8(s2)
    addi s1, s2, 8
    lr.w a6, (s1)                     # sign-extended word
    lr.w.aq a6, (s2)
    sc.w.rl a7, t1, (s1)              # reservation on another word: fails
    lr.w s3, (s1)
    sc.w s4, t1, (s1)                 # succeeds
    lw s5, 8(s2)
    lr.d.aqrl s6, (s2)
    sd t0, 64(s2)                     # a store elsewhere keeps the reservation
    sc.d.aqrl s7, t0, (s2)
    ld s8, 0(s2)
    lr.d s9, (s2)
    sc.d s9, s9, (s2)                 # rd == rs2
    lr.w s10, (s2)
    addi s10, s10, -1
    sc.w s10, s10, (s2)
    lw s11, (s2)
    la t2, __buf + 4092
    lr.w t3, (t2)                     # last word of a page
    sc.w t4, t3, (t2)
    # a retry loop as compilers emit for atomic increments
    la t5, __buf + 192
    li t6, 10
1:  lr.d a0, (t5)
    addi a0, a0, 3
    sc.d a1, a0, (t5)
    bnez a1, 1b
    addi t6, t6, -1
    bnez t6, 1b
    """
    check_user(asm.user_program(body, seed=26))
