"""fence.i and self-modifying code on every engine against qemu-riscv64.

New instructions are stored (sw, sh, amoswap, sc, fsw, a page-crossing sw) into code that has
already run — and so, under jit, is already translated — then fence.i makes them visible.
Each test also checks the expected result itself, so QEMU and pyvirt cannot agree on a stale
result by accident.
"""

from __future__ import annotations

import pytest

from pyvirt.testing import asm


def _encode_addi(rd: int, rs1: int, imm: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (rd << 7) | 0x13


def _c_addi(rd: int, imm: int) -> int:
    return 0x0001 | ((imm >> 5) & 1) << 12 | rd << 7 | (imm & 31) << 2


S2 = 18   # x18, the accumulator the patched code adds to


def _reg(r, n: int) -> int:
    return int.from_bytes(r.stdout[8 * n:8 * n + 8], "little")


# Code that gets rewritten: 32-bit encodings only, unless a test says `.option rvc`.
SMC_SECTION = '    .pushsection .smc, "awx"\n    .option push\n    .option norvc\n    .balign 4096\n'
SMC_END = "    .option pop\n    .popsection\n"


def test_patch_then_execute_straight_line(check_user) -> None:
    body = f"""
    li s2, 0
    la t0, 1f
    li t1, {_encode_addi(S2, S2, 77):#x}
    sw t1, 0(t0)
    fence.i
1:  addi s2, s2, 1                  # replaced by addi s2, s2, 77
    """
    body = SMC_SECTION + "smc_entry:\n" + body + "    j smc_out\n" + SMC_END + "    j smc_entry\nsmc_out:\n"
    r = check_user(asm.user_program(body, seed=61))
    assert _reg(r, S2) == 77


@pytest.mark.parametrize("store", ["sw", "amoswap.w", "sc.w", "fsw", "two_sh"])
def test_patch_hot_function(check_user, store: str) -> None:
    """A function runs 12 times (translated on its first or second run), one of its instructions
    is rewritten, fence.i, and it runs 12 more times with the new instruction."""
    new = _encode_addi(S2, S2, 100)
    if store == "sw":
        patch = f"li t1, {new:#x}\n    sw t1, 0(t0)"
    elif store == "amoswap.w":
        patch = f"li t1, {new:#x}\n    amoswap.w t2, t1, (t0)"
    elif store == "sc.w":
        patch = f"li t1, {new:#x}\n1:  lr.w t2, (t0)\n    sc.w t2, t1, (t0)\n    bnez t2, 1b"
    elif store == "fsw":
        patch = f"li t1, {new:#x}\n    fmv.w.x ft0, t1\n    fsw ft0, 0(t0)"
    else:
        patch = f"li t1, {new & 0xFFFF:#x}\n    sh t1, 0(t0)\n    li t1, {new >> 16:#x}\n    sh t1, 2(t0)"
    body = f"""
    li s2, 0
    li s3, 12
1:  call hot_fn
    addi s3, s3, -1
    bnez s3, 1b
    la t0, hot_patch
    {patch}
    fence.i
    li s3, 12
2:  call hot_fn
    addi s3, s3, -1
    bnez s3, 2b
    j 3f
{SMC_SECTION}
hot_fn:
    addi s2, s2, 3
hot_patch:
    addi s2, s2, 1                  # becomes addi s2, s2, 100
    addi s2, s2, 5
    ret
{SMC_END}3:
    """
    r = check_user(asm.user_program(body, seed=62))
    assert _reg(r, S2) == 12 * 9 + 12 * 108


def test_patch_compressed_instruction_in_hot_loop(check_user) -> None:
    """A loop that is one translated block (an in-block loop under jit) gets a compressed
    instruction of its body rewritten from outside between runs."""
    body = f"""
    li s2, 0
    li s4, 3
1:  li s3, 20
    call loop_fn
    la t0, loop_patch
    lhu t1, 0(t0)
    addi t1, t1, 4                  # c.addi s2, k -> c.addi s2, k+1 (imm bits 6:2)
    sh t1, 0(t0)
    fence.i
    addi s4, s4, -1
    bnez s4, 1b
    j 2f
{SMC_SECTION}
    .option rvc
loop_fn:
loop_top:
    c.addi s2, 1
loop_patch:
    c.addi s2, 2
    addi s3, s3, -1
    bnez s3, loop_top
    ret
{SMC_END}2:
    """
    r = check_user(asm.user_program(body, seed=63))
    assert _reg(r, S2) == 20 * (3 + 4 + 5)


def test_block_patches_its_own_successor(check_user) -> None:
    """The running block stores into the instruction right after its fence.i (same page)."""
    body = f"""
    la s5, smc_self
    jalr ra, 0(s5)
    j 9f
{SMC_SECTION}
smc_self:
    li s2, 0
    li s3, 4
    la t0, 1f
    li t1, {_encode_addi(S2, S2, 1):#x}
0:  addi s2, s2, 1000
    sw t1, 0(t0)
    fence.i
1:  addi s2, s2, 100                # 100 only if the store were not seen
    addi s3, s3, -1
    li t1, {_encode_addi(S2, S2, 10):#x}
    bnez s3, 0b
    ret
{SMC_END}9:
    """
    r = check_user(asm.user_program(body, seed=64))
    assert _reg(r, S2) == 4 * 1000 + 1 + 3 * 10


def test_generated_code_buffer(check_user) -> None:
    """A JIT-like guest: writes a small function into a buffer, runs it, overwrites it with a
    different one, runs again -- several rounds, in the same page as data it keeps storing to."""
    rounds = 6
    words = []
    for k in range(rounds):
        fn = [_encode_addi(S2, S2, k + 1), _encode_addi(S2, S2, 10 * (k + 1)), 0x00008067]   # ret
        words.append(", ".join(hex(w) for w in fn))
    table_src = "\n".join(f"    .word {w}" for w in words)
    body = f"""
    li s2, 0
    la s3, code_templates
    li s4, {rounds}
1:  la t0, code_buf
    lw t1, 0(s3)
    sw t1, 0(t0)
    lw t1, 4(s3)
    sw t1, 4(t0)
    lw t1, 8(s3)
    sw t1, 8(t0)
    sd s4, 64(t0)                   # data next to the code, same page
    fence.i
    jalr ra, 0(t0)
    jalr ra, 0(t0)
    ld t2, 64(t0)
    add s2, s2, t2
    addi s3, s3, 12
    addi s4, s4, -1
    bnez s4, 1b
    j 2f
{SMC_SECTION}
code_buf:
    .space 128
code_templates:
{table_src}
{SMC_END}2:
    """
    r = check_user(asm.user_program(body, seed=65))
    assert _reg(r, S2) == sum(2 * 11 * (k + 1) for k in range(rounds)) + sum(range(1, rounds + 1))


def test_patch_page_straddling_instruction(check_user) -> None:
    """Rewrite a 32-bit instruction that straddles two pages, one half per page."""
    new = _encode_addi(S2, S2, 500)
    body = f"""
    li s2, 0
    li s3, 2
1:  call straddle_fn
    addi s3, s3, -1
    bnez s3, 1b
    la t0, straddle_insn
    li t1, {new & 0xFFFF:#x}
    sh t1, 0(t0)
    li t1, {new >> 16:#x}
    sh t1, 2(t0)
    fence.i
    call straddle_fn
    j 2f
{SMC_SECTION}
    .option rvc
    .rept 2046
    c.nop
    .endr
straddle_fn:                         # page offset 0xffc
    c.addi s2, 1
    .option norvc
straddle_insn:                      # 0xffe
    addi s2, s2, 20
    ret
{SMC_END}2:
    """
    r = check_user(asm.user_program(body, seed=66))
    assert _reg(r, S2) == 2 * 21 + 501
