/* Trap entries, mode switching and reporting for the bare-metal CPU tests (see bare.h). */
#define FRAME 256
#define EXIT_MAGIC 0x5EC0DE

    .option norvc
    .text

.macro SAVE_REGS
    addi sp, sp, -FRAME
    sd x1, 8(sp)
    sd x3, 24(sp)
    sd x4, 32(sp)
    sd x5, 40(sp)
    sd x6, 48(sp)
    sd x7, 56(sp)
    sd x8, 64(sp)
    sd x9, 72(sp)
    sd x10, 80(sp)
    sd x11, 88(sp)
    sd x12, 96(sp)
    sd x13, 104(sp)
    sd x14, 112(sp)
    sd x15, 120(sp)
    sd x16, 128(sp)
    sd x17, 136(sp)
    sd x18, 144(sp)
    sd x19, 152(sp)
    sd x20, 160(sp)
    sd x21, 168(sp)
    sd x22, 176(sp)
    sd x23, 184(sp)
    sd x24, 192(sp)
    sd x25, 200(sp)
    sd x26, 208(sp)
    sd x27, 216(sp)
    sd x28, 224(sp)
    sd x29, 232(sp)
    sd x30, 240(sp)
    sd x31, 248(sp)
.endm

.macro LOAD_REGS
    ld x1, 8(sp)
    ld x3, 24(sp)
    ld x4, 32(sp)
    ld x5, 40(sp)
    ld x6, 48(sp)
    ld x7, 56(sp)
    ld x8, 64(sp)
    ld x9, 72(sp)
    ld x10, 80(sp)
    ld x11, 88(sp)
    ld x12, 96(sp)
    ld x13, 104(sp)
    ld x14, 112(sp)
    ld x15, 120(sp)
    ld x16, 128(sp)
    ld x17, 136(sp)
    ld x18, 144(sp)
    ld x19, 152(sp)
    ld x20, 160(sp)
    ld x21, 168(sp)
    ld x22, 176(sp)
    ld x23, 184(sp)
    ld x24, 192(sp)
    ld x25, 200(sp)
    ld x26, 208(sp)
    ld x27, 216(sp)
    ld x28, 224(sp)
    ld x29, 232(sp)
    ld x30, 240(sp)
    ld x31, 248(sp)
    addi sp, sp, FRAME
.endm

/* M-mode trap entry: mscratch holds the M trap stack. */
    .balign 64
    .globl m_trap_entry
m_trap_entry:
    csrrw sp, mscratch, sp
    SAVE_REGS
    csrr t0, mscratch
    sd t0, 16(sp)
    mv a0, sp
    call m_trap_c
    LOAD_REGS
    csrrw sp, mscratch, sp
    mret

/* S-mode trap entry: sscratch holds the S trap stack. */
    .balign 64
    .globl s_trap_entry
s_trap_entry:
    csrrw sp, sscratch, sp
    SAVE_REGS
    csrr t0, sscratch
    sd t0, 16(sp)
    mv a0, sp
    call s_trap_c
    LOAD_REGS
    csrrw sp, sscratch, sp
    sret

/* Vectored trap tables (xtvec mode 1): exceptions at +0, interrupt i at +4*i.  The slots
   of the supervisor interrupts count their use in x_vec_hits[i] (others in [15]). */
.macro VEC_SLOT name, scratch, hits, index, entry
\name:
    csrrw sp, \scratch, sp
    sd t0, -8(sp)
    sd t1, -16(sp)
    la t0, \hits
    ld t1, (8 * \index)(t0)
    addi t1, t1, 1
    sd t1, (8 * \index)(t0)
    ld t1, -16(sp)
    ld t0, -8(sp)
    csrrw sp, \scratch, sp
    j \entry
.endm

    .balign 256
    .globl s_vector_table
s_vector_table:
    j s_trap_entry
    j s_slot1
    j s_bad
    j s_bad
    j s_bad
    j s_slot5
    j s_bad
    j s_bad
    j s_bad
    j s_slot9
    j s_bad
    j s_bad
    j s_bad
    j s_bad
    j s_bad
    j s_bad
    VEC_SLOT s_slot1, sscratch, s_vec_hits, 1, s_trap_entry
    VEC_SLOT s_slot5, sscratch, s_vec_hits, 5, s_trap_entry
    VEC_SLOT s_slot9, sscratch, s_vec_hits, 9, s_trap_entry
    VEC_SLOT s_bad, sscratch, s_vec_hits, 15, s_trap_entry

    .balign 256
    .globl m_vector_table
m_vector_table:
    j m_trap_entry
    j m_slot1
    j m_bad
    j m_bad
    j m_bad
    j m_slot5
    j m_bad
    j m_bad
    j m_bad
    j m_slot9
    j m_bad
    j m_bad
    j m_bad
    j m_bad
    j m_bad
    j m_bad
    VEC_SLOT m_slot1, mscratch, m_vec_hits, 1, m_trap_entry
    VEC_SLOT m_slot5, mscratch, m_vec_hits, 5, m_trap_entry
    VEC_SLOT m_slot9, mscratch, m_vec_hits, 9, m_trap_entry
    VEC_SLOT m_bad, mscratch, m_vec_hits, 15, m_trap_entry

/* u64 enter_mode(mode, fn, arg, stack): run fn(arg) in `mode` on `stack`; returns the value
   it passes to lower_exit() (or that reaches M through an ecall with a7 = EXIT_MAGIC). */
    .globl enter_mode
enter_mode:
    la t0, m_ctx
    sd ra, 0(t0)
    sd sp, 8(t0)
    sd s0, 16(t0)
    sd s1, 24(t0)
    sd s2, 32(t0)
    sd s3, 40(t0)
    sd s4, 48(t0)
    sd s5, 56(t0)
    sd s6, 64(t0)
    sd s7, 72(t0)
    sd s8, 80(t0)
    sd s9, 88(t0)
    sd s10, 96(t0)
    sd s11, 104(t0)
    li t1, 3 << 11
    csrc mstatus, t1
    slli t2, a0, 11
    csrs mstatus, t2
    csrw mepc, a1
    mv a0, a2
    mv sp, a3
    la ra, lower_exit
    mret

    .globl lower_exit
lower_exit:
    li a7, EXIT_MAGIC
    ecall
1:  j 1b

/* Called by m_trap_c (on the trap stack) to return from enter_mode with value a0. */
    .globl m_longjmp
m_longjmp:
    la t0, m_trap_stack_top
    csrw mscratch, t0
    la t0, s_trap_stack_top
    csrw sscratch, t0
    la t0, m_ctx
    ld ra, 0(t0)
    ld sp, 8(t0)
    ld s0, 16(t0)
    ld s1, 24(t0)
    ld s2, 32(t0)
    ld s3, 40(t0)
    ld s4, 48(t0)
    ld s5, 56(t0)
    ld s6, 64(t0)
    ld s7, 72(t0)
    ld s8, 80(t0)
    ld s9, 88(t0)
    ld s10, 96(t0)
    ld s11, 104(t0)
    ret

/* call_at(a): jalr to a with the resume point of a fault set to just after the call. */
    .globl call_at
call_at:
    addi sp, sp, -16
    sd ra, 8(sp)
    la t0, 1f
    la t1, m_resume
    sd t0, 0(t1)
    la t1, s_resume
    sd t0, 0(t1)
    jalr ra, 0(a0)
1:  la t1, m_resume
    sd zero, 0(t1)
    la t1, s_resume
    sd zero, 0(t1)
    ld ra, 8(sp)
    addi sp, sp, 16
    ret

    .bss
    .balign 16
    .globl s_vec_hits, m_vec_hits
s_vec_hits: .space 128
m_vec_hits: .space 128
m_ctx: .space 128
    .balign 16
    .space 8192
    .globl m_trap_stack_top
m_trap_stack_top:
    .space 16
    .space 8192
    .globl s_trap_stack_top
s_trap_stack_top:
    .space 16
    .space 8192
    .globl lower_stack_top
lower_stack_top:
    .space 16
