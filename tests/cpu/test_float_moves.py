"""F and D on every engine against qemu-riscv64: loads/stores (every alignment, page-crossing),
moves, NaN-boxing, sign injection, conversions, a smoke test of the arithmetic, and fcsr /
fflags / frm through every CSR instruction form.  (Deep arithmetic: the FPU's own tests.)"""

from __future__ import annotations

from cpu_gen import table

from pyvirt.testing import asm

# Doubles and singles (bit patterns) with signs, NaNs, infinities, subnormals.
F64 = [0x3FF0000000000000, 0xC004000000000000, 0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000,
       0x7FF4000000000000, 0x0000000000000001, 0x8000000000000000, 0x400921FB54442D18, 0x4004000000000000,
       0xC00C000000000000, 0x3FF8000000000000, 0x41E0000000000000, 0xC3E0000000000000, 0x3E80000000000000,
       0x0010000000000000]
F32 = [0x3F800000, 0xC0200000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FA00000, 0x00000001, 0x80000000,
       0x40490FDB, 0x40200000, 0xC0600000, 0x3FC00000, 0x4F000000, 0xCF000000, 0x34000000, 0x00800000]
DATA = table("__f64", F64) + "\n" + table("__f32", [v | 0xFFFFFFFF00000000 for v in F32])


def test_fp_loads_and_stores_every_alignment(check_user) -> None:
    body = "    la s4, __buf + 8192 - 12\n"
    for i, (load, store) in enumerate([("flw", "fsw"), ("fld", "fsd")]):
        body += f"""
    li s2, 0
1:  add t0, s4, s2
    {load} ft0, 0(t0)
    fmv.x.d a0, ft0
    la t1, __buf + {256 + 512 * i}
    slli t2, s2, 3
    add t1, t1, t2
    sd a0, 0(t1)
    li t3, {-4096 if i == 0 else 4096}
    add t3, t3, t0
    {store} ft0, 0(t3)                # back out at the same alignment, another page
    addi s2, s2, 1
    li t2, 20
    bltu s2, t2, 1b
"""
    body += """
    la t0, __buf + 2048
    fld fa0, -2048(t0)
    flw fa1, 2044(t0)
    fsd fa0, 2040(t0)
    fsw fa1, -2048(t0)
    """
    check_user(asm.user_program(body, seed=41, bufsize=16384), bufsize=16384)


def test_moves_boxing_and_sign_injection(check_user) -> None:
    body = """
    la s2, __f64
    la s3, __f32
    fld fs0, 0(s2)
    fld fs1, 8(s2)
    flw fs2, 4(s3)                    # a boxed single
    fld fs3, 32(s2)
    li t0, 0x12345678C0200000
    fmv.d.x fs4, t0                   # NOT a boxed single: reads as the canonical NaN
    fmv.x.w a0, fs2                   # sign-extends bit 31
    fmv.x.w a1, fs4                   # low 32 bits, whatever the boxing
    fmv.x.d a2, fs4
    li t1, 0xFFFFFFFF80000001
    fmv.w.x fs5, t1                   # boxes the low word
    fmv.x.d a3, fs5
    fsgnj.s fs6, fs2, fs5
    fsgnjn.s fs7, fs2, fs2            # fneg.s
    fsgnjx.s fs8, fs2, fs5
    fsgnj.s fs9, fs4, fs2             # unboxed input
    fsgnj.s fs10, fs2, fs4            # unboxed sign source
    fabs.s fs11, fs2
    fsgnj.d ft0, fs0, fs1
    fsgnjn.d ft1, fs1, fs1
    fsgnjx.d ft2, fs1, fs1            # fabs.d
    fmv.d ft3, fs4
    fneg.d ft4, fs3
    fmv.s ft5, fs4                    # fmv.s of an unboxed value
    la t2, __buf
    fsw fs4, 0(t2)                    # fsw stores the low word even when unboxed
    fsd fs5, 8(t2)
    flw ft6, 8(t2)
    fmv.x.d a4, ft6
    fclass.s a5, fs4
    fclass.s a6, fs2
    fclass.d a7, fs3
    """
    check_user(asm.user_program(body, seed=42, data=DATA))


def test_conversions_and_arithmetic_smoke(check_user) -> None:
    body = "    la s2, __f64\n    la s3, __f32\n    la s1, __buf\n"
    for i in range(len(F64)):
        body += f"""
    fld ft0, {8 * i}(s2)
    flw ft1, {8 * i}(s3)
    fcvt.w.d a0, ft0, rtz
    fcvt.wu.d a1, ft0, rne
    fcvt.l.d a2, ft0, rdn
    fcvt.lu.d a3, ft0, rup
    fcvt.w.s a4, ft1, rmm
    fcvt.l.s a5, ft1
    fcvt.s.d ft2, ft0
    fcvt.d.s ft3, ft1
    fadd.d ft4, ft0, ft3
    fmul.s ft5, ft1, ft2
    fdiv.d ft6, ft0, ft3
    fsqrt.s ft7, ft1
    fmin.d ft8, ft0, ft3
    fmax.s ft9, ft1, ft2
    fmadd.d ft10, ft0, ft3, ft4
    feq.d a6, ft0, ft3
    flt.s a7, ft1, ft2
    fle.d t0, ft0, ft4
    frflags t1
    csrwi fflags, 0
    sd a0, 0(s1)
    sd a1, 8(s1)
    sd a2, 16(s1)
    sd a3, 24(s1)
    sd a4, 32(s1)
    sd a5, 40(s1)
    sd a6, 48(s1)
    sd a7, 56(s1)
    sd t0, 64(s1)
    sd t1, 72(s1)
    fsd ft2, 80(s1)
    fsd ft3, 88(s1)
    fsd ft4, 96(s1)
    fsd ft5, 104(s1)
    fsd ft6, 112(s1)
    fsd ft7, 120(s1)
    fsd ft8, 128(s1)
    fsd ft9, 136(s1)
    fsd ft10, 144(s1)
    addi s1, s1, 152
"""
    body += """
    li t0, -7
    fcvt.d.l fa0, t0
    fcvt.s.w fa1, t0
    fcvt.d.wu fa2, t0
    fcvt.s.lu fa3, t0
    li t1, 0x7FFFFFFFFFFFFFFF
    fcvt.s.l fa4, t1, rdn
    fcvt.d.lu fa5, t1, rup
    """
    check_user(asm.user_program(body, seed=43, data=DATA))


def test_fcsr_fflags_frm_csr_forms(check_user) -> None:
    body = """
    li t0, 0xFFFFFFFFFFFFFF35
    csrrw a0, fcsr, t0                # upper bits dropped: fcsr = 0x35
    frcsr a1
    csrrs a2, fflags, x0              # read only
    csrrc a3, fflags, 0x5             # clears NX and OF?  bits 0 and 2 of the value
    li t1, 0x3
    csrrc a3, fflags, t1
    csrrs a4, fflags, t1
    csrrwi a5, frm, 2
    csrrsi a6, frm, 1                 # frm 3
    csrrci a7, frm, 2                 # frm 1
    csrrsi s2, fflags, 0x1F
    csrrci s3, fflags, 0x10
    csrrwi s4, fcsr, 0x1F             # frm 0, all flags
    fsrm s5, t0                       # frm = 5 (reserved value may be written)
    frrm s6
    fsrmi s7, 4
    fsflags s8, x0
    fsflagsi s9, 0x0A
    frflags s10
    fscsr s11, x0
    frcsr ra
    """
    check_user(asm.user_program(body, seed=44))


def test_dynamic_rounding_follows_frm(check_user) -> None:
    """Each frm value (0-4) drives the dynamic rounding of conversions and arithmetic."""
    values = [0x4004000000000000, 0xC004000000000000, 0x3FF8000000000000, 0xBFE0000000000000,
              0x4016000000000000, 0x3FB999999999999A]
    body = "    la s2, __vals\n    la s1, __buf\n"
    for rm in range(5):
        body += f"    fsrmi {rm}\n"
        for i in range(len(values)):
            body += f"""
    fld ft0, {8 * i}(s2)
    fcvt.w.d a0, ft0
    fcvt.l.d a1, ft0, dyn
    fcvt.s.d ft1, ft0
    fdiv.d ft2, ft0, ft0
    li t0, 3
    fcvt.d.l ft3, t0
    fdiv.d ft4, ft0, ft3
    fdiv.s ft5, ft1, ft1
    sd a0, 0(s1)
    sd a1, 8(s1)
    fsd ft1, 16(s1)
    fsd ft4, 24(s1)
    fsd ft5, 32(s1)
    addi s1, s1, 40
"""
    check_user(asm.user_program(body, seed=45, data=table("__vals", values)))
