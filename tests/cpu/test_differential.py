"""Differential test: seeded random instruction sequences run under qemu-riscv64 and on every
pyvirt engine; registers, FP state and the scratch memory must match after every sequence.

Each program holds SEQUENCES sequences of 20-200 instructions mixing RV64I ALU and W ops,
M, loads and stores of every width at any alignment (across a page boundary too), AMOs,
LR/SC pairs, compressed forms, FP loads/stores/moves, forward branches and jumps, and small
counted loops.  Every
sequence is a function called twice (so jit hot=2 runs it translated the second time), with
a dump of the whole state after each call.

Register roles: gp = dump area, sp = scratch (for c.*sp forms), tp = loop counter, s0 =
scratch base at a page boundary; all other registers are fair game, x0 included as a target.
"""

from __future__ import annotations

import random

import pytest

from pyvirt.testing import asm
from pyvirt.testing.usermode import run_elf

SEEDS = range(12)
SEQUENCES = 25
BUFSIZE = 8192

WRITABLE = [1] + list(range(5, 8)) + list(range(9, 32))
READABLE = [0, 1, 2, 3, 4, 8] + WRITABLE
CREGS_W = list(range(9, 16))          # x9..x15 (x8 = s0 is the base)
CREGS_R = list(range(8, 16))
R_OPS = ["add", "sub", "sll", "slt", "sltu", "xor", "srl", "sra", "or", "and",
         "addw", "subw", "sllw", "srlw", "sraw",
         "mul", "mulh", "mulhsu", "mulhu", "div", "divu", "rem", "remu",
         "mulw", "divw", "divuw", "remw", "remuw"]
I_OPS = ["addi", "slti", "sltiu", "xori", "ori", "andi", "addiw"]
SHIFT_OPS = [("slli", 63), ("srli", 63), ("srai", 63), ("slliw", 31), ("srliw", 31), ("sraiw", 31)]
LOADS = [("lb", 1), ("lbu", 1), ("lh", 2), ("lhu", 2), ("lw", 4), ("lwu", 4), ("ld", 8)]
STORES = [("sb", 1), ("sh", 2), ("sw", 4), ("sd", 8)]
AMOS = ["amoswap", "amoadd", "amoxor", "amoand", "amoor", "amomin", "amomax", "amominu", "amomaxu"]
BRANCHES = ["beq", "bne", "blt", "bge", "bltu", "bgeu"]
C_RR = ["c.sub", "c.xor", "c.or", "c.and", "c.subw", "c.addw"]
EDGES = [0, 1, -1, 0x7FFFFFFF, -0x80000000, 0xFFFFFFFF, 0x7FFFFFFFFFFFFFFF, -0x8000000000000000, 63, 64]


class Generator:
    def __init__(self, rng: random.Random, tag: str) -> None:
        self.rng = rng
        self.tag = tag
        self.labels = 0
        self.out: list[str] = []

    def label(self) -> str:
        self.labels += 1
        return f"{self.tag}_{self.labels}"

    def w(self) -> int:
        return self.rng.choice(WRITABLE)

    def r(self) -> int:
        return self.rng.choice(READABLE)

    def emit(self, line: str) -> None:
        self.out.append("    " + line)

    # -- simple (branch-free, memory-free) operations -----------------------------------
    def alu(self) -> None:
        rng = self.rng
        k = rng.random()
        if k < 0.45:
            rd = 0 if rng.random() < 0.03 else self.w()
            self.emit(f"{rng.choice(R_OPS)} x{rd}, x{self.r()}, x{self.r()}")
        elif k < 0.65:
            self.emit(f"{rng.choice(I_OPS)} x{self.w()}, x{self.r()}, {rng.randint(-2048, 2047)}")
        elif k < 0.77:
            op, mx = rng.choice(SHIFT_OPS)
            self.emit(f"{op} x{self.w()}, x{self.r()}, {rng.choice([0, 1, mx, mx - 1, rng.randint(0, mx)])}")
        elif k < 0.82:
            self.emit(f"{rng.choice(['lui', 'auipc'])} x{self.w()}, {rng.randint(0, 0xFFFFF):#x}")
        elif k < 0.86:
            self.emit(f"li x{self.w()}, {rng.choice(EDGES)}")
        else:
            self.compressed_alu()

    def compressed_alu(self) -> None:
        rng = self.rng
        k = rng.randrange(9)
        cw = rng.choice(CREGS_W)
        if k == 0:
            self.emit(f"{rng.choice(C_RR)} x{cw}, x{rng.choice(CREGS_R)}")
        elif k == 1:
            self.emit(f"c.mv x{self.w()}, x{rng.choice([r for r in READABLE if r])}")
        elif k == 2:
            self.emit(f"c.add x{self.w()}, x{rng.choice([r for r in READABLE if r])}")
        elif k == 3:
            self.emit(f"c.li x{self.w()}, {rng.randint(-32, 31)}")
        elif k == 4:
            self.emit(f"c.addi x{self.w()}, {rng.choice([i for i in range(-32, 32) if i])}")
        elif k == 5:
            self.emit(f"c.addiw x{self.w()}, {rng.randint(-32, 31)}")
        elif k == 6:
            self.emit(f"c.lui x{self.w()}, {rng.choice(list(range(1, 32)) + list(range(0xFFFE0, 0x100000))):#x}")
        elif k == 7:
            op = rng.choice(["c.srli", "c.srai"])
            self.emit(f"{op} x{cw}, {rng.randint(1, 63)}" if rng.random() < 0.7
                      else f"c.andi x{cw}, {rng.randint(-32, 31)}")
        else:
            self.emit(f"c.slli x{self.w()}, {rng.randint(1, 63)}")

    # -- memory ------------------------------------------------------------------------
    def memory(self) -> None:
        rng = self.rng
        k = rng.random()
        if k < 0.35:
            op, size = rng.choice(LOADS)
            self.emit(f"{op} x{self.w()}, {rng.randint(-2048, 2048 - size)}(s0)")
        elif k < 0.65:
            op, size = rng.choice(STORES)
            self.emit(f"{op} x{self.r()}, {rng.randint(-2048, 2048 - size)}(s0)")
        elif k < 0.80:
            cw = rng.choice(CREGS_W)
            op = rng.choice(["c.lw", "c.ld", "c.sw", "c.sd"])
            off = rng.randrange(0, 128, 4) if op in ("c.lw", "c.sw") else rng.randrange(0, 256, 8)
            self.emit(f"{op} x{cw if op[2] == 'l' else rng.choice(CREGS_R)}, {off}(s0)")
        else:
            op = rng.choice(["c.lwsp", "c.ldsp", "c.swsp", "c.sdsp"])
            off = rng.randrange(0, 256, 4) if op in ("c.lwsp", "c.swsp") else rng.randrange(0, 512, 8)
            reg = self.w() if "l" in op[2:4] else self.r()
            self.emit(f"{op} x{reg}, {off}(sp)")

    def fp_move(self) -> None:
        """FP loads, stores, moves and sign injection (no arithmetic: that is the FPU's tests')."""
        rng = self.rng
        f1, f2, f3 = (rng.randrange(32) for _ in range(3))
        k = rng.randrange(8)
        if k == 0:
            op, size = rng.choice([("fld", 8), ("flw", 4)])
            self.emit(f"{op} f{f1}, {rng.randint(-2048, 2048 - size)}(s0)")
        elif k == 1:
            op, size = rng.choice([("fsd", 8), ("fsw", 4)])
            self.emit(f"{op} f{f1}, {rng.randint(-2048, 2048 - size)}(s0)")
        elif k == 2:
            self.emit(f"{rng.choice(['fmv.d.x', 'fmv.w.x'])} f{f1}, x{self.r()}")
        elif k == 3:
            self.emit(f"{rng.choice(['fmv.x.d', 'fmv.x.w'])} x{self.w()}, f{f1}")
        elif k == 4:
            op = rng.choice(["fsgnj", "fsgnjn", "fsgnjx"]) + rng.choice([".s", ".d"])
            self.emit(f"{op} f{f1}, f{f2}, f{f3}")
        elif k == 5:
            self.emit(f"{rng.choice(['c.fld', 'c.fsd'])} f{rng.randrange(8, 16)}, {rng.randrange(0, 256, 8)}(s0)")
        elif k == 6:
            self.emit(f"{rng.choice(['c.fldsp', 'c.fsdsp'])} f{f1}, {rng.randrange(0, 512, 8)}(sp)")
        else:
            self.emit(f"fclass.{rng.choice('sd')} x{self.w()}, f{f1}")

    def amo(self) -> None:
        rng = self.rng
        width = rng.choice(["w", "d"])
        off = rng.randrange(-2048, 2048, 8) + (rng.choice([0, 4]) if width == "w" else 0)
        self.emit(f"addi x31, s0, {off}")
        order = rng.choice(["", "", ".aq", ".rl", ".aqrl"])
        self.emit(f"{rng.choice(AMOS)}.{width}{order} x{self.w()}, x{self.r()}, (x31)")

    def lr_sc(self) -> None:
        rng = self.rng
        width = rng.choice(["w", "d"])
        off = rng.randrange(-2048, 2048, 8)
        self.emit(f"addi x31, s0, {off}")
        if rng.random() < 0.85:
            self.emit(f"lr.{width} x{rng.choice([r for r in WRITABLE if r != 31])}, (x31)")
            for _ in range(rng.randint(0, 2)):
                self.emit(f"{rng.choice(R_OPS[:10])} x{rng.choice([r for r in WRITABLE if r != 31])}, "
                          f"x{self.r()}, x{self.r()}")
        self.emit(f"sc.{width} x{self.w()}, x{self.r()}, (x31)")

    # -- control flow ------------------------------------------------------------------
    def forward_branch(self) -> None:
        rng = self.rng
        target = self.label()
        k = rng.random()
        if k < 0.6:
            self.emit(f"{rng.choice(BRANCHES)} x{self.r()}, x{self.r()}, {target}")
        elif k < 0.8:
            self.emit(f"{rng.choice(['c.beqz', 'c.bnez'])} x{rng.choice(CREGS_R)}, {target}")
        elif k < 0.9:
            self.emit(f"jal x{rng.choice([0] + WRITABLE)}, {target}")
        else:
            self.emit(f"c.j {target}")
        for _ in range(rng.randint(1, 3)):
            self.alu()
        self.out.append(f"{target}:")

    def loop(self) -> None:
        rng = self.rng
        top = self.label()
        self.emit(f"li tp, {rng.randint(1, 24)}")
        self.out.append(f"{top}:")
        for _ in range(rng.randint(1, 5)):
            self.alu()
        if rng.random() < 0.5:
            self.memory()
        self.emit("addi tp, tp, -1")
        self.emit(f"bnez tp, {top}")

    def sequence(self, n: int) -> list[str]:
        rng = self.rng
        while len(self.out) < n:
            k = rng.random()
            if k < 0.55:
                self.alu()
            elif k < 0.75:
                self.memory()
            elif k < 0.81:
                self.amo()
            elif k < 0.83:
                self.lr_sc()
            elif k < 0.86:
                self.fp_move()
            elif k < 0.94:
                self.forward_branch()
            elif k < 0.97:
                self.loop()
            else:
                self.emit(rng.choice(["fence", "fence.i", "nop", "c.nop", "fence rw, rw"]))
        return self.out


def sequence(seed: int, index: int) -> str:
    """Sequence `index` of program `seed` (also what a failure report shows)."""
    rng = random.Random(seed * 1000 + index)
    lines = Generator(rng, f"s{index}").sequence(rng.randint(20, 200))
    return "\n".join(lines)


def program(seed: int) -> str:
    main = ["    la s0, __buf + 4096", "    la sp, __buf + 5120"]
    funcs = []
    for i in range(SEQUENCES):
        main += [f"    jal ra, seq_{i}", "    jal ra, __dump", f"    jal ra, seq_{i}", "    jal ra, __dump"]
        funcs += [f"seq_{i}:", "    sd ra, 520(gp)", sequence(seed, i), "    ld ra, 520(gp)", "    ret"]
    return "\n".join(main) + "\n    j 9f\n" + "\n".join(funcs) + "\n9:\n"


def _first_difference(got: bytes, want: bytes) -> int:
    size = asm.DUMP_HEAD + BUFSIZE
    for i in range(0, min(len(got), len(want)), size):
        if got[i:i + size] != want[i:i + size]:
            return i // size
    return min(len(got), len(want)) // size


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequences_match_qemu(seed: int, engine: tuple[str, int]) -> None:
    elf = asm.user_program(program(seed), seed=1000 + seed, bufsize=BUFSIZE)
    q = asm.run_qemu_user(elf)
    assert q.returncode == 0, q.stderr.decode(errors="replace")
    assert len(q.stdout) == (2 * SEQUENCES + 1) * (asm.DUMP_HEAD + BUFSIZE)
    r = run_elf(elf, engine=engine[0], hot=engine[1])
    assert r.fault is None, "pyvirt faulted: mcause={:#x} mepc={:#x} mtval={:#x}".format(*r.fault)
    assert r.exit_code == 0
    if r.stdout != q.stdout:
        dump = _first_difference(r.stdout, q.stdout)
        seq = min(dump // 2, SEQUENCES - 1)
        raise AssertionError(f"{asm.describe_difference(r.stdout, q.stdout, BUFSIZE)}; "
                             f"sequence {seq} (call {dump % 2 + 1}):\n{sequence(seed, seq)}")
