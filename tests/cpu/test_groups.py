"""Instruction groups, run on every engine and under qemu-riscv64: register and memory dumps must match."""

from __future__ import annotations

import zlib

import pytest

from pyvirt.testing.guestprog import run_qemu_user, user_program
from pyvirt.testing.usermode import run_elf

GROUPS = {
    "alu": """
        add x6, x7, x8
        sub x9, x10, x11
        xor x12, x13, x14
        or x15, x16, x17
        and x18, x19, x20
        slt x21, x22, x23
        sltu x24, x25, x26
        addi x27, x28, -2048
        slti x29, x30, -1
        sltiu x31, x6, -1
        xori x7, x8, -1
        ori x8, x9, 0x555
        andi x9, x10, -16
        lui x10, 0xfffff
        lui x11, 0x7ffff
        auipc x12, 0x12345
        auipc x13, 0
        mv x14, x0
        addi x0, x15, 5
    """,
    "shifts": """
        sll x6, x7, x8
        srl x9, x10, x11
        sra x12, x13, x14
        slli x15, x16, 63
        srli x17, x18, 63
        srai x19, x20, 63
        slli x21, x22, 0
        srai x23, x24, 1
        sllw x25, x26, x27
        srlw x28, x29, x30
        sraw x31, x6, x7
        slliw x8, x9, 31
        srliw x10, x11, 31
        sraiw x12, x13, 31
        srliw x14, x15, 0
        addw x16, x17, x18
        subw x19, x20, x21
        addiw x22, x23, -1
        sext.w x24, x25
    """,
    "muldiv": """
        mul x6, x7, x8
        mulh x9, x10, x11
        mulhsu x12, x13, x14
        mulhu x15, x16, x17
        div x18, x19, x20
        divu x21, x22, x23
        rem x24, x25, x26
        remu x27, x28, x29
        mulw x30, x31, x6
        divw x7, x8, x9
        divuw x10, x11, x12
        remw x13, x14, x15
        remuw x16, x17, x18
        div x19, x20, x0
        rem x21, x22, x0
        divu x23, x24, x0
        li x25, -0x8000000000000000
        li x26, -1
        div x27, x25, x26
        rem x28, x25, x26
        li x29, -0x80000000
        divw x30, x29, x26
        remw x31, x29, x26
    """,
    "branches": """
        li x6, 0
        li x7, 5
        li x8, -5
        blt x8, x7, 1f
        addi x6, x6, 1
    1:  bltu x8, x7, 2f
        addi x6, x6, 2
    2:  bge x7, x8, 3f
        addi x6, x6, 4
    3:  bgeu x7, x8, 4f
        addi x6, x6, 8
    4:  beq x7, x7, 5f
        addi x6, x6, 16
    5:  bne x7, x7, 6f
        addi x6, x6, 32
    6:  li x9, 10
        li x10, 0
    7:  add x10, x10, x9
        addi x9, x9, -1
        bnez x9, 7b
        jal x11, 8f
        addi x6, x6, 64
    8:  la x12, 9f
        jalr x13, 0(x12)
        addi x6, x6, 128
    9:  la x14, 10f
        jalr x14, 0(x14)
    10: nop
    """,
    "loadstore": """
        li x6, 0x1122334455667788
        sd x6, 0(x5)
        sw x6, 8(x5)
        sh x6, 12(x5)
        sb x6, 14(x5)
        ld x7, 0(x5)
        lw x8, 4(x5)
        lwu x9, 4(x5)
        lh x10, 6(x5)
        lhu x11, 6(x5)
        lb x12, 7(x5)
        lbu x13, 7(x5)
        sd x6, 33(x5)
        ld x14, 33(x5)
        lw x15, 35(x5)
        li x16, 4092
        add x16, x16, x5
        sd x6, 0(x16)
        ld x17, 0(x16)
        lw x18, 2(x16)
        lhu x19, 3(x16)
        li x20, -8
        sd x20, 128(x5)
        lb x21, 128(x5)
        lh x22, 130(x5)
    """,
    "atomics": """
        li x6, 100
        sd x6, 64(x5)
        addi x7, x5, 64
        li x8, -3
        amoadd.d x9, x8, (x7)
        amoswap.d x10, x8, (x7)
        amoxor.d x11, x6, (x7)
        amoand.d x12, x6, (x7)
        amoor.d x13, x6, (x7)
        amomin.d x14, x8, (x7)
        amomax.d x15, x6, (x7)
        amominu.d x16, x8, (x7)
        amomaxu.d x17, x8, (x7)
        addi x18, x5, 72
        li x19, 0x7fffffff
        sw x19, 0(x18)
        amoadd.w x20, x19, (x18)
        amomin.w x21, x8, (x18)
        amomax.w x22, x19, (x18)
        amominu.w x23, x8, (x18)
        amoswap.w x24, x8, (x18)
        lr.d x25, (x7)
        sc.d x26, x6, (x7)
        sc.d x27, x8, (x7)
        lr.w x28, (x18)
        addi x29, x28, 1
        sc.w x30, x29, (x18)
        lw x31, 0(x18)
    """,
    "compressed": """
        c.li x8, -7
        c.addi x8, 5
        c.lui x9, 0x1f
        c.mv x10, x8
        c.add x10, x9
        c.sub x10, x8
        c.xor x10, x9
        c.or x10, x8
        c.and x10, x9
        c.andi x10, -3
        c.srli x10, 3
        c.srai x9, 1
        c.slli x9, 7
        c.addiw x8, -1
        c.addw x8, x9
        c.subw x8, x10
        c.mv x11, x5
        c.sd x8, 8(x11)
        c.sw x9, 16(x11)
        c.ld x12, 8(x11)
        c.lw x13, 16(x11)
        c.fsd f8, 24(x11)
        c.fld f9, 24(x11)
        mv x14, sp
        mv sp, x5
        c.addi16sp sp, 64
        c.addi4spn x15, sp, 16
        c.sdsp x8, 0(sp)
        c.swsp x9, 8(sp)
        c.ldsp x16, 0(sp)
        c.lwsp x17, 8(sp)
        c.fsdsp f9, 16(sp)
        c.fldsp f10, 16(sp)
        mv sp, x14
        li x14, 0
        c.beqz x8, 1f
        c.bnez x8, 1f
        c.li x18, 1
    1:  c.j 2f
        c.li x19, 1
    2:  la x20, 3f
        c.jalr x20
    3:  la x21, 4f
        c.jr x21
        c.li x22, 1
    4:  c.nop
    """,
    "float": """
        li x6, 3
        fcvt.d.l f1, x6
        li x7, 7
        fcvt.d.l f2, x7
        fdiv.d f3, f1, f2
        fmul.d f4, f3, f2
        fsub.d f5, f4, f1
        fsqrt.d f6, f2
        fmadd.d f7, f1, f2, f3
        fcvt.s.d f8, f3
        fadd.s f9, f8, f8
        fcvt.w.d x8, f6, rtz
        fcvt.l.d x9, f6, rup
        feq.d x10, f1, f1
        flt.d x11, f2, f1
        fclass.d x12, f5
        fmv.x.d x13, f3
        fmv.d.x f10, x13
        fsgnjn.d f11, f3, f3
        fmin.d f12, f1, f2
        fsd f3, 200(x5)
        flw f13, 200(x5)
        fsw f9, 208(x5)
        fld f14, 208(x5)
        csrwi frm, 3
        fcvt.s.d f15, f3
        fadd.d f16, f1, f3, dyn
        csrr x14, frm
        frflags x15
        csrwi fflags, 0
        fsflags x16, x15
    """,
    "csr_user": """
        rdcycle x6
        rdtime x7
        rdinstret x8
        rdcycle x9
        rdtime x10
        rdinstret x11
        sltu x12, x9, x6
        sltu x13, x10, x7
        sltu x14, x11, x8
        li x6, 0
        li x7, 0
        li x8, 0
        li x9, 0
        li x10, 0
        li x11, 0
    """,
    "self_modifying": """
        la x20, smc_code
        jalr x1, 0(x20)
        j smc_done
        .pushsection .smc, "awx"
        .option norvc
    smc_code:
        la x6, 1f
        lw x7, 4(x6)
        li x9, 0
        li x10, 3
    0:  addi x9, x9, 1000
        sw x7, 0(x6)
        fence.i
    1:  addi x9, x9, 100
        addi x9, x9, 1
        addi x10, x10, -1
        bnez x10, 0b
        ret
        .popsection
    smc_done:
    """,
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_matches_qemu(group: str, engine: tuple[str, int]) -> None:
    exe = user_program(GROUPS[group], seed=zlib.crc32(group.encode()))
    code, expected = run_qemu_user(exe)
    assert code == 0
    r = run_elf(exe, engine=engine[0], hot=engine[1])
    assert r.fault is None, f"fault {r.fault}"
    assert r.exit_code == 0
    assert len(r.stdout) == len(expected)
    if r.stdout != expected:
        names = [f"x{i}" for i in range(32)] + [f"f{i}" for i in range(32)]
        for i in range(64):
            got = r.stdout[8 * i:8 * i + 8]
            want = expected[8 * i:8 * i + 8]
            assert got == want, f"{names[i]}: pyvirt {got[::-1].hex()} qemu {want[::-1].hex()}"
        assert r.stdout == expected


def test_self_modifying_code_changes_result(engine: tuple[str, int]) -> None:
    """The store really replaced the instruction: 3 iterations of `addi 1` twice, not 100+1."""
    exe = user_program(GROUPS["self_modifying"])
    r = run_elf(exe, engine=engine[0], hot=engine[1])
    x9 = int.from_bytes(r.stdout[8 * 9:8 * 10], "little")
    assert x9 == 3 * (1000 + 1 + 1)     # after fence.i, `addi 100` is really `addi 1`


@pytest.mark.parametrize("insn, raw", [(".word 0xffffffff", 0xFFFFFFFF), (".word 0x00000000", 0),
                                       ("csrr x6, mstatus", 0x30002373), ("mret", 0x30200073)])
def test_illegal_instruction_faults(insn: str, raw: int, engine: tuple[str, int]) -> None:
    exe = user_program("    .option norvc\n" + insn)
    code, _ = run_qemu_user(exe)
    assert code == -4 or code == 132               # SIGILL under qemu-user
    r = run_elf(exe, engine=engine[0], hot=engine[1])
    assert r.fault is not None
    cause, epc, tval = r.fault
    assert cause == 2
    assert tval in (raw, raw & 0xFFFF, 0)     # 48-bit+ prefixes report their first parcel


def test_misaligned_amo_faults(engine: tuple[str, int]) -> None:
    exe = user_program("    addi x7, x5, 3\n    amoadd.d x8, x6, (x7)")
    r = run_elf(exe, engine=engine[0], hot=engine[1])
    assert r.fault is not None and r.fault[0] in (6, 7)
