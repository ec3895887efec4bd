"""Generated instruction sequences: pyvirt (every engine) against qemu-riscv64.

Each program runs several random sequences; after each one it dumps all
registers, FP registers, fcsr and the scratch buffer, so one ELF checks many
sequences.  Registers x5 (the buffer base), sp and gp are never written.
"""

from __future__ import annotations

import random

import pytest

from pyvirt.testing.guestprog import run_qemu_user, user_program
from pyvirt.testing.usermode import run_elf

REGS = [r for r in range(6, 32)]
R_OPS = ["add", "sub", "xor", "or", "and", "slt", "sltu", "sll", "srl", "sra", "addw", "subw", "sllw",
         "srlw", "sraw", "mul", "mulh", "mulhu", "mulhsu", "div", "divu", "rem", "remu", "mulw", "divw",
         "divuw", "remw", "remuw"]
I_OPS = ["addi", "xori", "ori", "andi", "slti", "sltiu", "addiw"]
SH_OPS = [("slli", 63), ("srli", 63), ("srai", 63), ("slliw", 31), ("srliw", 31), ("sraiw", 31)]
LOADS = [("lb", 1), ("lh", 2), ("lw", 4), ("ld", 8), ("lbu", 1), ("lhu", 2), ("lwu", 4)]
STORES = [("sb", 1), ("sh", 2), ("sw", 4), ("sd", 8)]
AMOS = ["amoadd", "amoswap", "amoxor", "amoand", "amoor", "amomin", "amomax", "amominu", "amomaxu"]
BRANCHES = ["beq", "bne", "blt", "bge", "bltu", "bgeu"]
C_OPS = ["c.add", "c.mv", "c.sub", "c.xor", "c.or", "c.and", "c.addw", "c.subw"]
CREGS = list(range(8, 16))


def sequence(rng: random.Random, n: int, tag: str) -> str:
    out = []
    labels = 0
    for _ in range(n):
        r = lambda: rng.choice(REGS)  # noqa: E731
        k = rng.random()
        if k < 0.30:
            out.append(f"{rng.choice(R_OPS)} x{r()}, x{r()}, x{r()}")
        elif k < 0.45:
            out.append(f"{rng.choice(I_OPS)} x{r()}, x{r()}, {rng.randint(-2048, 2047)}")
        elif k < 0.52:
            op, mx = rng.choice(SH_OPS)
            out.append(f"{op} x{r()}, x{r()}, {rng.randint(0, mx)}")
        elif k < 0.62:
            op, size = rng.choice(LOADS)
            out.append(f"{op} x{r()}, {rng.randrange(0, 2040)}(x5)")
        elif k < 0.72:
            op, size = rng.choice(STORES)
            out.append(f"{op} x{r()}, {rng.randrange(0, 2040)}(x5)")
        elif k < 0.77:
            width = rng.choice(["w", "d"])
            off = rng.randrange(0, 255) * 8
            out.append(f"addi x31, x5, {off}")
            out.append(f"{rng.choice(AMOS)}.{width} x{rng.choice(REGS[:-1])}, x{rng.choice(REGS[:-1])}, (x31)")
        elif k < 0.85:
            out.append(f"{rng.choice(C_OPS)} x{rng.choice(CREGS)}, x{rng.choice(CREGS)}")
        elif k < 0.92:
            labels += 1
            out.append(f"{rng.choice(BRANCHES)} x{r()}, x{r()}, {tag}_{labels}")
            for _ in range(rng.randint(1, 3)):
                out.append(f"{rng.choice(I_OPS)} x{r()}, x{r()}, {rng.randint(-100, 100)}")
            out.append(f"{tag}_{labels}:")
        else:
            out.append(f"lui x{r()}, {rng.randint(0, 0xFFFFF)}")
    return "\n".join("    " + line for line in out)


def program(seed: int, count: int = 12) -> str:
    rng = random.Random(seed)
    parts = []
    for i in range(count):
        parts.append(sequence(rng, rng.randint(20, 120), f"s{seed}_{i}"))
        parts.append("    jal ra, dump_more")
    return "\n".join(parts) + """
    j dump_and_exit
dump_more:
    mv x31, ra
""" + "\n".join(f"    sd x{r}, {8 * r}(gp)" for r in range(6, 32)) + """
    frcsr t6
    sd t6, 512(gp)
    li a0, 1
    mv a1, gp
    li a2, 1032
    li a7, 64
    ecall
    ld x31, 248(gp)
    ld a0, 80(gp)
    ld a1, 88(gp)
    ld a2, 96(gp)
    ld a7, 136(gp)
    jr x31
"""


@pytest.mark.parametrize("seed", range(8))
def test_random_sequences_match_qemu(seed: int, engine: tuple[str, int]) -> None:
    exe = user_program(program(seed), seed=seed)
    code, expected = run_qemu_user(exe)
    assert code == 0
    r = run_elf(exe, engine=engine[0], hot=engine[1])
    assert r.fault is None and r.exit_code == 0
    assert len(r.stdout) == len(expected)
    for start in range(0, len(expected), 1032):
        got, want = r.stdout[start:start + 1032], expected[start:start + 1032]
        if got != want:
            for i in range(0, 1032, 8):
                assert got[i:i + 8] == want[i:i + 8], f"dump {start // 1032}, offset {i}: " \
                    f"pyvirt {got[i:i + 8][::-1].hex()} qemu {want[i:i + 8][::-1].hex()}"
