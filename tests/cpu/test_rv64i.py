"""RV64I on every engine against qemu-riscv64: ALU, immediates, shifts (W forms, shamt edges),
lui/auipc, every branch taken and not taken, jal/jalr (rd == rs1, odd targets), loads and
stores of every width at every alignment, inside a page and across a page boundary."""

from __future__ import annotations

import pytest
from cpu_gen import IMMEDIATES, VALUES, binops, pair_loop, result_words, results_start, single_loop, table

from pyvirt.compat import zip_strict
from pyvirt.testing import asm

N = len(VALUES)
DATA = table("__vals", VALUES)

R_OPS = ["add", "sub", "sll", "slt", "sltu", "xor", "srl", "sra", "or", "and",
         "addw", "subw", "sllw", "srlw", "sraw"]
I_OPS = ["addi", "slti", "sltiu", "xori", "ori", "andi", "addiw"]
SHIFTS = {"slli": [0, 1, 2, 31, 32, 33, 62, 63], "srli": [0, 1, 2, 31, 32, 33, 62, 63],
          "srai": [0, 1, 2, 31, 32, 33, 62, 63], "slliw": [0, 1, 2, 15, 30, 31],
          "srliw": [0, 1, 2, 15, 30, 31], "sraiw": [0, 1, 2, 15, 30, 31]}
BRANCHES = ["beq", "bne", "blt", "bge", "bltu", "bgeu"]


def test_register_register_ops(check_user) -> None:
    size = result_words(len(R_OPS) * N * N)
    check_user(asm.user_program(binops(R_OPS, N), seed=11, bufsize=size, data=DATA), bufsize=size)


def test_register_immediate_ops(check_user) -> None:
    body = results_start()
    count = 0
    for op in I_OPS:
        for imm in IMMEDIATES:
            body += single_loop(f"    {op} a2, a0, {imm}", N)
            count += N
    for op, amounts in SHIFTS.items():
        for sh in amounts:
            body += single_loop(f"    {op} a2, a0, {sh}", N)
            count += N
    size = result_words(count)
    check_user(asm.user_program(body, seed=12, bufsize=size, data=DATA), bufsize=size)


def test_register_aliasing_and_x0(check_user) -> None:
    """rd == rs1 == rs2, reads of x0, writes to x0 (discarded) and the pseudo-instructions."""
    body = """
    .option norvc
    add t0, t0, t0
    sub t1, t1, t1
    xor t2, t2, t2
    sltu a0, x0, a0          # snez
    sltiu a1, a1, 1          # seqz
    slt a2, a2, a2
    sra a3, a3, a3
    sllw a4, a4, a4
    sraw a5, a5, a5
    srlw a6, a6, a6
    addi x0, a7, 123         # nop-like: x0 stays 0
    add x0, s2, s3
    lui x0, 0x12345
    sub s4, x0, s4           # neg
    subw s5, x0, s5          # negw
    xori s6, s6, -1          # not
    addiw s7, s7, 0          # sext.w
    add s8, x0, x0
    or s9, x0, s9
    slli s10, s10, 0
    srai s11, s11, 0
    slli x0, x5, 3           # HINTs: no effect
    sltu x0, t0, t1
    .word 0x0100000f         # pause (Zihintpause)
    .word 0x8330000f         # fence.tso
    .word 0x0000000f         # fence with empty sets
    fence iorw, iorw
    """
    check_user(asm.user_program(body, seed=13))


def test_lui_auipc(check_user) -> None:
    body = ".option norvc\n"
    regs = ["t0", "t1", "t2", "a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "s2"]
    imms = [0, 1, 0x7FFFF, 0x80000, 0xFFFFF, 0x12345, 0x80001, 0xFFFFE, 0x40000, 0xC0000, 2, 0xABCDE]
    for r, imm in zip_strict(regs, imms):
        body += f"    lui {r}, {imm:#x}\n"
    body += "    jal ra, __dump\n"
    for r, imm in zip_strict(regs, imms):
        body += f"    auipc {r}, {imm:#x}\n"
    body += """
    auipc s3, 0
    addi s3, s3, -4           # its own address, by hand
1:  auipc s4, %pcrel_hi(__buf)
    addi s4, s4, %pcrel_lo(1b)
    """
    check_user(asm.user_program(body, seed=14))


def test_branches_taken_and_not_taken(check_user) -> None:
    body = results_start()
    count = 0
    for op in BRANCHES:
        body += pair_loop(f"    li a2, 1\n    {op} a0, a1, 3f\n    li a2, 0\n3:", N)
        count += N * N
        # against x0 on both sides
        body += single_loop(f"    li a2, 1\n    {op} a0, x0, 3f\n    li a2, 0\n3:", N)
        body += single_loop(f"    li a2, 1\n    {op} x0, a0, 3f\n    li a2, 0\n3:", N)
        # a register against itself
        body += single_loop(f"    li a2, 1\n    {op} a0, a0, 3f\n    li a2, 0\n3:", N)
        count += 3 * N
    # Taken backward branches of every kind: count down from 5 with each.
    for op, cond in [("bne", "a0, x0"), ("blt", "x0, a0"), ("bge", "a0, a1"), ("bltu", "x0, a0"),
                     ("bgeu", "a0, a1"), ("beq", "a3, x0")]:
        body += f"""
    li a0, 5
    li a1, 1
    li a2, 0
4:  addi a2, a2, 3
    addi a0, a0, -1
    seqz a3, a0               # for beq: loop while a3 == 0
    {op} {cond}, 4b
    sd a2, 0(s1)
    addi s1, s1, 8
"""
        count += 1
    size = result_words(count)
    check_user(asm.user_program(body, seed=15, bufsize=size, data=DATA), bufsize=size)


def test_jal_jalr(check_user) -> None:
    body = """
    .option norvc
    li s2, 0
    jal t0, 1f                # link into t0, forward
    addi s2, s2, 1
1:  la t2, 2f
    jalr t3, 0(t2)
    addi s2, s2, 2
2:  la t4, 3f
    jalr t4, 0(t4)            # rd == rs1: the target is read before the link is written
    addi s2, s2, 4
3:  la t5, 4f + 1
    jalr x0, 0(t5)            # odd target: bit 0 is cleared
    addi s2, s2, 8
4:  la a0, 5f + 8
    jalr a1, -8(a0)           # negative offset
    addi s2, s2, 16
5:  jal x0, 6f
    addi s2, s2, 32
6:  la ra, 7f
    jalr ra, 0(ra)            # rd == rs1 == ra
    addi s2, s2, 64
7:  la a2, 8f - 2047
    jalr a3, 2047(a2)         # largest positive offset
    addi s2, s2, 128
8:  la a4, 9f + 2048
    jalr a5, -2048(a4)        # most negative offset
    addi s2, s2, 256
9:  call 10f
    j 11f
10: mv a6, ra
    addi s3, s3, 1
    ret
11: la a7, 12f
    jr a7
    addi s2, s2, 512
12: li s4, 3                  # a backward jal loop
13: addi s4, s4, -1
    beqz s4, 14f
    jal x0, 13b
14: jal s5, 15f               # link register then immediately overwritten
15: addi s5, s5, 1
    """
    check_user(asm.user_program(body, seed=16))


LOADS = ["lb", "lbu", "lh", "lhu", "lw", "lwu", "ld"]
STORES = ["sb", "sh", "sw", "sd"]


def test_loads_every_width_and_alignment(check_user) -> None:
    """Every load at offsets -16..+8 around a page boundary: aligned, misaligned, crossing."""
    body = results_start() + "    la s4, __buf + 12288 - 16\n"
    for op in LOADS:
        body += f"""
    li s2, 0
1:  add t0, s4, s2
    {op} a2, 0(t0)
    sd a2, 0(s1)
    addi s1, s1, 8
    addi s2, s2, 1
    li t2, 25
    bltu s2, t2, 1b
"""
    body += """
    la t0, __buf + 10240
    ld a0, -2048(t0)
    lw a1, 2047(t0)
    lhu a2, -1(t0)
    ld t0, 8(t0)              # rd == rs1
    la t1, __buf + 64
    lb x0, 0(t1)              # result discarded
    ld zero, 3(t1)
    """
    check_user(asm.user_program(body, seed=17, bufsize=16384), bufsize=16384)


def test_stores_every_width_and_alignment(check_user) -> None:
    """Every store at offsets around a page boundary; the buffer dump holds the result."""
    body = "    la s4, __buf + 12288 - 24\n    la s0, __vals\n"
    for i, op in enumerate(STORES):
        body += f"""
    addi s5, s4, {i * 1024 - 2048}
    li s2, 0
1:  add t0, s5, s2
    slli t1, s2, 3
    add t1, s0, t1
    ld a0, 0(t1)
    {op} a0, 0(t0)
    addi s2, s2, 1
    li t2, 25
    bltu s2, t2, 1b
"""
    body += """
    add t0, s4, 24
    sd t0, 0(t0)              # stores its own base
    sw t0, 100(t0)
    la t1, __buf + 2048
    li t2, 0x1122334455667788
    sd t2, -2048(t1)
    sh t2, 2047(t1)
    sb x0, 5(t1)
    sd x0, 16(t1)
    """
    check_user(asm.user_program(body, seed=18, bufsize=16384, data=table("__vals", VALUES)), bufsize=16384)


def test_store_then_load_forwarding(check_user) -> None:
    """Mixed-width store/load sequences on one location, misaligned and page-crossing."""
    body = """
    la s4, __buf + 4096 - 3
    li a0, 0x8877665544332211
    sd a0, 0(s4)
    lw a1, 1(s4)
    lhu a2, 2(s4)
    sb a1, 4(s4)
    lb a3, 4(s4)
    ld a4, 0(s4)
    sh a0, 3(s4)
    lwu a5, 1(s4)
    ld a6, -1(s4)
    sw a6, 2(s4)
    ld a7, 0(s4)
    """
    check_user(asm.user_program(body, seed=19))


@pytest.mark.parametrize("imm", [0, 1, 63, 64, -64])
def test_long_straight_line_block(check_user, imm: int) -> None:
    """A block longer than the translator's block limit, dependent chains through every register."""
    regs = [r for r in range(1, 32) if r not in (2, 3)]
    lines = []
    for i in range(150):
        rd, rs1, rs2 = regs[i % len(regs)], regs[(i * 7 + 3) % len(regs)], regs[(i * 11 + 5) % len(regs)]
        op = ["add", "sub", "xor", "sll", "srl", "sra", "addw", "sltu", "or", "and"][i % 10]
        lines.append(f"    {op} x{rd}, x{rs1}, x{rs2}")
        if i % 13 == 0:
            lines.append(f"    addi x{rd}, x{rd}, {imm}")
    check_user(asm.user_program("\n".join(lines), seed=20 + imm))


def test_long_running_loops(check_user) -> None:
    """Loops running past the translator's in-block loop budget and the harness's slice size,
    with loads and stores in the body, nested in an outer loop."""
    body = """
    la s4, __buf
    li s2, 0
    li s3, 3
1:  li t0, 30011                   # inner loop: 6 instructions a trip
2:  andi t1, t0, 0x3f8
    add t2, s4, t1
    ld t3, 0(t2)
    add t3, t3, t0
    sd t3, 0(t2)
    xor s2, s2, t3
    addi t0, t0, -1
    bnez t0, 2b
    addi s3, s3, -1
    bnez s3, 1b
    """
    check_user(asm.user_program(body, seed=27))
