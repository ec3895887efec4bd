"""The C extension on every engine against qemu-riscv64: every RV64C instruction form with its
immediate edges, compressed control flow, and 32-bit instructions at 2-byte alignment including
one that straddles a page boundary.  (c.ebreak's fault is in test_faults.py.)"""

from __future__ import annotations

import random

import pytest

from pyvirt.testing import asm

CREGS = ["s0", "s1", "a0", "a1", "a2", "a3", "a4", "a5"]

# Every RV64C form except control flow; s1 is the memory base, sp points into __buf.
FORMS = """
    la s1, __buf + 1024
    la sp, __buf + 3072
    c.li a0, -32
    c.li a1, 31
    c.li t0, 0
    c.addi a2, -32
    c.addi a3, 31
    c.addi t1, 1
    c.nop
    c.addiw a4, -32
    c.addiw a5, 31
    c.addiw t2, 0              # sext.w
    c.lui t3, 1
    c.lui t4, 0x1f
    c.lui t5, 0xfffe0          # sign-extended: negative
    c.lui t6, 0xfffff
    c.srli a2, 1
    c.srli a3, 63
    c.srai a4, 1
    c.srai a5, 63
    c.srai s0, 32
    c.andi a0, -32
    c.andi a1, 31
    c.andi a2, 0
    c.slli t0, 1
    c.slli t1, 63
    c.slli ra, 32
    c.mv t2, a3
    c.add t3, a4
    c.add t3, t3
    c.sub a0, a1
    c.xor a1, a2
    c.or a2, a3
    c.and a3, a4
    c.subw a4, a5
    c.addw a5, s0
    c.subw s0, s0
    c.lw a0, 0(s1)
    c.lw a1, 124(s1)
    c.ld a2, 0(s1)
    c.ld a3, 248(s1)
    c.sw a4, 4(s1)
    c.sw a5, 124(s1)
    c.sd t3, 8(s1)             # not a compressed register: assembled as sd
    c.sd a0, 248(s1)
    c.sd s1, 16(s1)            # stores its own base
    c.fld fs0, 248(s1)
    c.fld fa5, 0(s1)
    c.fsd fs1, 32(s1)
    c.fsd fa0, 240(s1)
    c.lwsp t0, 0(sp)
    c.lwsp t1, 252(sp)
    c.ldsp t2, 0(sp)
    c.ldsp ra, 504(sp)
    c.swsp t4, 4(sp)
    c.swsp t5, 252(sp)
    c.sdsp t6, 16(sp)
    c.sdsp t3, 504(sp)
    c.fldsp ft0, 8(sp)
    c.fldsp fs11, 504(sp)
    c.fsdsp ft1, 24(sp)
    c.fsdsp fs10, 496(sp)
    c.addi16sp sp, -512
    c.addi16sp sp, 496
    c.addi16sp sp, 16
    c.addi4spn a0, sp, 4
    c.addi4spn a1, sp, 1020
    c.addi4spn s0, sp, 512
"""


STORE_FORMS = {"c.sw", "c.sd", "c.fsd", "c.swsp", "c.sdsp", "c.fsdsp", "c.nop"}


def _forms_with_results() -> str:
    """FORMS with every result stored to __buf + 4096 (via s2) right after it is made."""
    out = []
    slot = 0
    for line in FORMS.replace("c.sd t3, 8(s1)             # not a compressed register: assembled as sd",
                              "c.sd a1, 8(s1)").splitlines():
        out.append(line)
        parts = line.split("#")[0].replace(",", " ").split()
        if not parts or not parts[0].startswith("c.") or parts[0] in STORE_FORMS:
            continue
        dest = parts[1]
        out.append(f"    {'fsd' if dest.startswith('f') else 'sd'} {dest}, {8 * slot}(s2)")
        slot += 1
    assert slot < 256
    return "\n".join(out) + "\n    addi s2, s2, 2040\n"


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_every_compressed_form(check_user, seed: int) -> None:
    """The forms run three times from different register values, dumping after each run."""
    rng = random.Random(seed)
    body = "    la s2, __buf + 4096\n"
    for _ in range(3):
        for r in CREGS + ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "ra"]:
            body += f"    li {r}, {rng.getrandbits(64) - (1 << 63)}\n"
        body += _forms_with_results() + "    jal ra, __dump\n"
    check_user(asm.user_program(body, seed=seed))


def test_compressed_control_flow(check_user) -> None:
    body = """
    li s2, 0
    li a0, 0
    li a1, 5
    c.beqz a0, 1f              # taken
    ori s2, s2, 1
1:  c.bnez a0, 2f              # not taken
    ori s2, s2, 2
2:  c.bnez a1, 3f              # taken
    ori s2, s2, 4
3:  c.beqz a1, 4f              # not taken
    ori s2, s2, 8
4:  c.j 5f
    ori s2, s2, 16
5:  la t0, 6f
    c.jr t0
    ori s2, s2, 32
6:  la t1, 7f
    c.jalr t1                  # link into ra
    ori s2, s2, 64
7:  mv s3, ra
    la ra, 8f
    c.jalr ra                  # rs1 == the link register: jumps to the old ra
    ori s2, s2, 128
8:  mv s4, ra
    li a2, 6                   # a compressed backward loop
9:  c.addi a2, -1
    c.addi s2, 16
    c.bnez a2, 9b
    li a3, 3
10: c.beqz a3, 11f
    c.addi a3, -1
    c.j 10b
11: call 12f                   # ret through c.jr ra
    j 13f
12: c.mv s5, ra
    c.jr ra
13: nop
    """
    check_user(asm.user_program(body, seed=34))


def test_mixed_widths_and_page_straddling_instruction(check_user) -> None:
    """32-bit instructions at 2-byte alignment, one of them straddling a page boundary; the
    code runs in a loop, so the translators see it hot, and is also entered by a jump to the
    straddling instruction itself."""
    body = """
    li s2, 0
    li s3, 5
    li s4, 3
    j straddle_loop
    .balign 4096
    .rept 2044
    c.nop
    .endr
straddle_loop:                  # page offset 0xff8
    c.addi s2, 1
    c.addi s2, 2
    c.addi s2, 3
straddle:                       # page offset 0xffe: a 32-bit instruction over the boundary
    addi s2, s2, 1000
    c.addi s2, 5
    addi s2, s2, 7              # 32-bit at a 2-byte-aligned address
    addi s3, s3, -1
    bnez s3, straddle_loop
    beqz s4, 1f
    addi s4, s4, -1
    li s3, 1
    la t0, straddle
    jr t0                       # entered at the straddling instruction itself
1:  nop
    """
    check_user(asm.user_program(body, seed=35))


def test_hints_execute_as_no_ops(check_user) -> None:
    """Compressed HINT encodings (rd = x0, zero immediates and shifts) change nothing."""
    hints = [0x1001, 0x0001, 0x4001, 0x4041, 0x607D, 0x8046, 0x0042, 0x1002, 0x9046, 0x8001, 0x8401,
             0x0501, 0x0002]
    body = "\n".join(f"    .hword {h:#06x}\n    jal ra, __dump" for h in hints)
    check_user(asm.user_program(body, seed=36))
