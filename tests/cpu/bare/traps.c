/* Traps in M-mode and across privilege levels: causes, xepc, xtval, xRET status updates,
 * delegation to S, trap virtualisation bits (TSR, TW, TVM), counter enables, FS. */
#include "bare.h"

#define SITE(name, insn) ".option push\n.option norvc\n.globl " #name "\n" #name ": " insn "\n.option pop\n"
extern char ecall_m_site[], ebreak_site[], c_ebreak_site[], illegal_site[], amo_mis_site[],
    lr_mis_site[], load_fault_site[], store_fault_site[], amo_fault_site[], u_ecall_site[],
    u_illegal_site[], s_ecall_site[], fp_off_site[], mret_site[], mret_after[];

#define HOLE 0x10000000UL      /* no memory or device here, on pyvirt or QEMU's spike */

static u64 buf[64] __attribute__((aligned(64)));

static void __attribute__((noinline)) machine_exceptions(void) {
    trap_reset();
    asm volatile(SITE(ecall_m_site, "ecall") ::: "memory");
    CHECK_EQ(m_rec.cause, C_ECALL_M);
    CHECK_EQ(m_rec.epc, (u64)ecall_m_site);
    CHECK_EQ(m_rec.tval, 0);
    CHECK_EQ((m_rec.status & MS_MPP) >> 11, PRV_M);

    trap_reset();
    asm volatile(SITE(ebreak_site, "ebreak") ::: "memory");
    CHECK_EQ(m_rec.cause, C_BREAKPOINT);
    CHECK_EQ(m_rec.epc, (u64)ebreak_site);
    CHECK(m_rec.tval == (u64)ebreak_site || (on_qemu() && m_rec.tval == 0));

    trap_reset();                             /* c.ebreak + c.nop: the handler skips 4 bytes */
    asm volatile(".option push\n.option rvc\n.globl c_ebreak_site\nc_ebreak_site: c.ebreak\n"
                 "c.nop\n.option pop" ::: "memory");
    CHECK_EQ(m_rec.cause, C_BREAKPOINT);
    CHECK_EQ(m_rec.epc, (u64)c_ebreak_site);

    trap_reset();
    asm volatile(SITE(illegal_site, ".word 0x0000f283") ::: "memory");
    CHECK_EQ(m_rec.cause, C_ILLEGAL);
    CHECK_EQ(m_rec.epc, (u64)illegal_site);
    CHECK_EQ(m_rec.tval, 0x0000f283);

    trap_reset();
    asm volatile("mv t0, %0\n" SITE(amo_mis_site, "amoadd.w t1, t1, (t0)") :: "r"((u64)buf + 2) : "t0", "t1", "memory");
    /* QEMU 7.2 reports a misaligned AMO as a load fault. */
    CHECK(m_rec.cause == C_STORE_MISALIGNED || (on_qemu() && m_rec.cause == C_LOAD_MISALIGNED));
    CHECK_EQ(m_rec.epc, (u64)amo_mis_site);
    CHECK_EQ(m_rec.tval, (u64)buf + 2);

    trap_reset();
    asm volatile("mv t0, %0\n" SITE(lr_mis_site, "lr.d t1, (t0)") :: "r"((u64)buf + 4) : "t0", "t1", "memory");
    CHECK_EQ(m_rec.cause, C_LOAD_MISALIGNED);
    CHECK_EQ(m_rec.tval, (u64)buf + 4);

    /* Access faults: nothing at HOLE. */
    trap_reset();
    asm volatile("mv t0, %0\n" SITE(load_fault_site, "ld t1, 8(t0)") :: "r"(HOLE) : "t0", "t1", "memory");
    CHECK_EQ(m_rec.cause, C_LOAD_ACCESS);
    CHECK_EQ(m_rec.epc, (u64)load_fault_site);
    CHECK_EQ(m_rec.tval, HOLE + 8);
    trap_reset();
    asm volatile("mv t0, %0\n" SITE(store_fault_site, "sw t1, 4(t0)") :: "r"(HOLE) : "t0", "t1", "memory");
    CHECK_EQ(m_rec.cause, C_STORE_ACCESS);
    CHECK_EQ(m_rec.tval, HOLE + 4);
    trap_reset();
    asm volatile("mv t0, %0\n" SITE(amo_fault_site, "amoswap.d t1, t1, (t0)") :: "r"(HOLE) : "t0", "t1", "memory");
    CHECK(m_rec.cause == C_STORE_ACCESS || (on_qemu() && m_rec.cause == C_LOAD_ACCESS));
    CHECK_EQ(m_rec.tval, HOLE);
    trap_reset();
    call_at(HOLE + 0x40);
    CHECK_EQ(m_rec.cause, C_FETCH_ACCESS);
    CHECK_EQ(m_rec.epc, HOLE + 0x40);
    CHECK_EQ(m_rec.tval, HOLE + 0x40);

    /* Misaligned ordinary loads and stores are carried out (no trap here), also across pages. */
    trap_reset();
    static u64 big[1024] __attribute__((aligned(4096)));
    u64 a = (u64)big + 4096 - 3;              /* across a page boundary */
    sd64(a, 0x1122334455667788UL);
    CHECK_EQ(ld64(a), 0x1122334455667788UL);
    CHECK_EQ(lw32(a + 1), 0x44556677);
    CHECK_EQ(m_rec.count, 0);
}

static void __attribute__((noinline)) machine_misc(void) {
    u64 misa = csrr(misa);
    CHECK_EQ(misa >> 62, 2);
    for (const char *p = "IMAFDCSU"; *p; p++) CHECK(misa & (1UL << (*p - 'A')));
    CHECK_EQ(csrr(mhartid), 0);

    /* mret: MIE <- MPIE, MPIE <- 1, MPP <- U, back to MPP's mode (M here). */
    csrc(mstatus, MS_MIE | MS_MPP);
    csrs(mstatus, MS_MPIE | MS_MPP);          /* MPP = M */
    csrw(mepc, (u64)mret_after);
    asm volatile(SITE(mret_site, "mret") SITE(mret_after, "nop") ::: "memory");
    u64 st = csrr(mstatus);
    CHECK(st & MS_MIE);
    CHECK(st & MS_MPIE);
    CHECK_EQ(st & MS_MPP, 0);
    csrc(mstatus, MS_MIE);

    /* FS: Off makes every FP instruction and FP CSR illegal; an FP write makes it Dirty. */
    csrc(mstatus, MS_FS);
    trap_reset();
    asm volatile(SITE(fp_off_site, "fadd.d f1, f2, f3") ::: "memory");
    CHECK_EQ(m_rec.cause, C_ILLEGAL);
    CHECK_EQ(m_rec.epc, (u64)fp_off_site);
    trap_reset();
    asm volatile(".option push\n.option norvc\nfrcsr t0\nfmv.x.d t0, f1\nfld f1, 0(sp)\n.option pop" ::: "t0", "memory");
    CHECK_EQ(m_rec.count, 3);
    CHECK_EQ((csrr(mstatus) & MS_FS) >> 13, 0);
    csrs(mstatus, 1UL << 13);                 /* Initial */
    asm volatile("fmv.d.x f1, zero" ::: "memory");
    st = csrr(mstatus);
    CHECK_EQ((st & MS_FS) >> 13, 3);
    CHECK(st & MS_SD);
    CHECK(csrr(sstatus) & MS_SD);

    /* Vectored mtvec: exceptions still go to the base. */
    csrw(mtvec, (u64)m_vector_table | 1);
    CHECK_EQ(csrr(mtvec), (u64)m_vector_table | 1);
    trap_reset();
    asm volatile("ecall" ::: "memory");
    CHECK_EQ(m_rec.cause, C_ECALL_M);
    CHECK_EQ(m_vec_hits[15] + m_vec_hits[1] + m_vec_hits[5] + m_vec_hits[9], 0);
    csrw(mtvec, (u64)m_trap_entry);

    /* WARL fields */
    csrw(medeleg, -1UL);
    u64 md = csrr(medeleg);
    CHECK(!(md & (1UL << C_ECALL_M)) || on_qemu());   /* "should" be read-only 0 */
    CHECK(md & (1UL << C_ILLEGAL));
    CHECK(md & (1UL << C_ECALL_U));
    CHECK(md & (1UL << C_LOAD_PAGE));
    csrw(medeleg, 0);
    csrw(mideleg, -1UL);
    CHECK_EQ(csrr(mideleg) & 0xAAA, 0x222);
    csrw(mideleg, 0);
    u64 old = csrr(mstatus);
    csrs(mstatus, MS_MPP);
    csrc(mstatus, 1UL << 11);                 /* MPP = 2 is reserved: WARL keeps a legal value */
    CHECK((csrr(mstatus) & MS_MPP) != (2UL << 11) || on_qemu());   /* QEMU 7.2 keeps 2 */
    csrw(mstatus, old);
    csrw(mepc, 0x80001233UL);
    CHECK(csrr(mepc) == 0x80001232UL || on_qemu());   /* IALIGN 16: bit 0 always 0 (not on QEMU 7.2) */
}

/* ---- lower modes ----------------------------------------------------------------- */
static u64 __attribute__((noinline)) u_ecall(u64 arg) {
    asm volatile("mv a7, %0\n" SITE(u_ecall_site, "ecall") :: "r"(arg) : "a7", "memory");
    return 0x55;
}

static u64 __attribute__((noinline)) u_illegal(u64 arg) {
    asm volatile(SITE(u_illegal_site, ".word 0x0000f283") ::: "memory");
    return arg + 1;
}

static u64 __attribute__((noinline)) s_ecall(u64 arg) {
    asm volatile("mv a7, %0\n" SITE(s_ecall_site, "ecall") :: "r"(arg) : "a7", "memory");
    return csrr(sstatus);
}

static u64 __attribute__((noinline)) insn_probe(u64 which) {
    /* One privileged instruction, selected by `which`; a trap skips it. */
    switch (which) {
    case 0: asm volatile(".option push\n.option norvc\nsret\n.option pop" ::: "memory"); break;
    case 1: asm volatile(".option push\n.option norvc\nmret\n.option pop" ::: "memory"); break;
    case 2: asm volatile(".option push\n.option norvc\nwfi\n.option pop" ::: "memory"); break;
    case 3: asm volatile(".option push\n.option norvc\nsfence.vma\n.option pop" ::: "memory"); break;
    case 4: { u64 v; asm volatile(".option push\n.option norvc\ncsrr %0, satp\n.option pop" : "=r"(v) :: "memory"); break; }
    case 5: { u64 v; asm volatile(".option push\n.option norvc\nrdcycle %0\n.option pop" : "=r"(v) :: "memory"); break; }
    case 6: { u64 v; asm volatile(".option push\n.option norvc\nrdtime %0\n.option pop" : "=r"(v) :: "memory"); break; }
    case 7: { u64 v; asm volatile(".option push\n.option norvc\nrdinstret %0\n.option pop" : "=r"(v) :: "memory"); break; }
    case 8: { u64 v; asm volatile(".option push\n.option norvc\ncsrr %0, mstatus\n.option pop" : "=r"(v) :: "memory"); break; }
    case 9: { u64 v; asm volatile(".option push\n.option norvc\ncsrr %0, sstatus\n.option pop" : "=r"(v) :: "memory"); break; }
    }
    return which;
}

extern char lower_stack_top[];

static u64 run(u64 mode, u64 (*fn)(u64), u64 arg) {
    return enter_mode(mode, (u64)fn, arg, (u64)lower_stack_top);
}

/* Does instruction `which` trap (to M, cause illegal) when run in `mode`? */
static int traps_in(u64 mode, u64 which) {
    trap_reset();
    CHECK_EQ(run(mode, insn_probe, which), which);
    return m_rec.count == 1 && m_rec.cause == C_ILLEGAL && (m_rec.status & MS_MPP) >> 11 == mode;
}

static void __attribute__((noinline)) lower_modes(void) {
    /* ecall from U and S, not delegated: to M with MPP = the mode. */
    trap_reset();
    CHECK_EQ(run(PRV_U, u_ecall, 7), 0x55);
    CHECK_EQ(m_rec.cause, C_ECALL_U);
    CHECK_EQ(m_rec.epc, (u64)u_ecall_site);
    CHECK_EQ(m_rec.a7, 7);
    CHECK_EQ((m_rec.status & MS_MPP) >> 11, PRV_U);
    trap_reset();
    run(PRV_S, s_ecall, 9);
    CHECK_EQ(m_rec.cause, C_ECALL_S);
    CHECK_EQ(m_rec.epc, (u64)s_ecall_site);
    CHECK_EQ((m_rec.status & MS_MPP) >> 11, PRV_S);
    /* Illegal in U, not delegated. */
    trap_reset();
    CHECK_EQ(run(PRV_U, u_illegal, 1), 2);
    CHECK_EQ(m_rec.cause, C_ILLEGAL);
    CHECK_EQ(m_rec.epc, (u64)u_illegal_site);
    CHECK_EQ(m_rec.tval, 0x0000f283);

    /* Delegated to S: U's ecall and illegal instruction reach the S handler. */
    csrw(medeleg, (1UL << C_ECALL_U) | (1UL << C_ILLEGAL));
    trap_reset();
    CHECK_EQ(run(PRV_U, u_ecall, 3), 0x55);
    CHECK_EQ(s_rec.count, 1);
    CHECK_EQ(s_rec.cause, C_ECALL_U);
    CHECK_EQ(s_rec.epc, (u64)u_ecall_site);
    CHECK_EQ(s_rec.tval, 0);
    CHECK_EQ(s_rec.a7, 3);
    CHECK_EQ(s_rec.status & MS_SPP, 0);
    CHECK_EQ(m_rec.count, 0);
    trap_reset();
    CHECK_EQ(run(PRV_U, u_illegal, 5), 6);
    CHECK_EQ(s_rec.cause, C_ILLEGAL);
    CHECK_EQ(s_rec.epc, (u64)u_illegal_site);
    CHECK_EQ(s_rec.tval, 0x0000f283);
    CHECK_EQ(m_rec.count, 0);
    /* An exception in M is never delegated. */
    trap_reset();
    asm volatile(".option push\n.option norvc\n.word 0x0000f283\n.option pop" ::: "memory");
    CHECK_EQ(m_rec.cause, C_ILLEGAL);
    CHECK_EQ(s_rec.count, 0);
    /* ecall from S is not delegated by bit 8. */
    trap_reset();
    run(PRV_S, s_ecall, 1);
    CHECK_EQ(m_rec.cause, C_ECALL_S);
    CHECK_EQ(s_rec.count, 0);
    csrw(medeleg, 0);

    /* Privileged instructions by mode and trap-virtualisation bits. */
    CHECK(traps_in(PRV_U, 0));                /* sret in U */
    CHECK(traps_in(PRV_S, 1));                /* mret in S */
    CHECK(traps_in(PRV_U, 2));                /* wfi in U */
    CHECK(traps_in(PRV_U, 3));                /* sfence.vma in U */
    CHECK(traps_in(PRV_U, 4));                /* satp in U */
    CHECK(traps_in(PRV_S, 8));                /* mstatus in S */
    CHECK(traps_in(PRV_U, 9));                /* sstatus in U */
    CHECK(!traps_in(PRV_S, 3));               /* sfence.vma in S */
    CHECK(!traps_in(PRV_S, 4));
    CHECK(!traps_in(PRV_S, 9));
    csrs(mstatus, MS_TVM);
    CHECK(traps_in(PRV_S, 3));
    CHECK(traps_in(PRV_S, 4));
    csrc(mstatus, MS_TVM);
    csrs(mstatus, MS_TW);
    CHECK(traps_in(PRV_S, 2));
    csrc(mstatus, MS_TW);
    csrs(mstatus, MS_TSR);
    CHECK(traps_in(PRV_S, 0));
    csrc(mstatus, MS_TSR);
    /* Counters: mcounteren gates S and U, scounteren gates U. */
    for (u64 i = 0; i < 3; i++) {
        if (i == 1 && on_qemu()) continue;      /* QEMU's spike machine has no time CSR */
        CHECK(!traps_in(PRV_U, 5 + i));
        csrw(scounteren, 7 & ~(1UL << i));
        CHECK(traps_in(PRV_U, 5 + i));
        CHECK(!traps_in(PRV_S, 5 + i));
        csrw(mcounteren, 7 & ~(1UL << i));
        CHECK(traps_in(PRV_S, 5 + i));
        csrw(mcounteren, 7);
        csrw(scounteren, 7);
    }
}

static u64 __attribute__((noinline)) s_sret_probe(u64 spie) {
    /* sret back to S: SIE <- SPIE, SPIE <- 1, SPP <- U. */
    extern char s_sret_after[];
    csrc(sstatus, MS_SIE | MS_SPIE);
    if (spie) csrs(sstatus, MS_SPIE);
    csrs(sstatus, MS_SPP);
    csrw(sepc, (u64)s_sret_after);
    asm volatile(".option push\n.option norvc\nsret\n.globl s_sret_after\ns_sret_after: nop\n.option pop" ::: "memory");
    u64 st = csrr(sstatus);
    csrc(sstatus, MS_SIE);
    return st;
}

static u64 __attribute__((noinline)) s_to_u(u64 arg) {
    /* From S, sret into U (SPP = 0) at u_ecall: its ecall goes to M (not delegated). */
    csrc(sstatus, MS_SPP);
    csrw(sepc, (u64)u_ecall);
    asm volatile("mv a0, %0\n la ra, lower_exit\n sret" :: "r"(arg) : "a0", "memory");
    return 0;
}

static void __attribute__((noinline)) xret_status(void) {
    u64 st = run(PRV_S, s_sret_probe, 1);
    CHECK(st & MS_SIE);
    CHECK(st & MS_SPIE);
    CHECK_EQ(st & MS_SPP, 0);
    st = run(PRV_S, s_sret_probe, 0);
    CHECK_EQ(st & MS_SIE, 0);
    CHECK(st & MS_SPIE);
    trap_reset();
    CHECK_EQ(run(PRV_S, s_to_u, 11), 0x55);
    CHECK_EQ(m_rec.cause, C_ECALL_U);
    CHECK_EQ(m_rec.a7, 11);
    /* sstatus is a view of mstatus. */
    csrs(mstatus, MS_SUM | MS_MXR | MS_MPIE);
    u64 ss = csrr(sstatus);
    CHECK(ss & MS_SUM);
    CHECK(ss & MS_MXR);
    CHECK_EQ(ss & (MS_MPIE | MS_MPP | MS_MIE | MS_TVM | MS_TW | MS_TSR), 0);
    CHECK_EQ(ss >> 32 & 3, 2);                 /* UXL = 64 */
    csrc(mstatus, MS_SUM | MS_MXR | MS_MPIE);
}

/* LR/SC and AMOs in a hot loop (translated), with RAM at 0x80000000. */
static u64 atomic_cells[4] __attribute__((aligned(64)));

static u64 __attribute__((noinline)) atomic_round(u64 i) {
    u64 fails, t0, t1;
    u64 *a = atomic_cells;
    asm volatile(".option push\n.option norvc\n"
                 "1: lr.d %1, (%3)\n addi %1, %1, 1\n sc.d %2, %1, (%3)\n bnez %2, 1b\n"
                 " sc.d %0, %1, (%3)\n"                       /* no reservation: fails */
                 ".option pop"
                 : "=&r"(fails), "=&r"(t0), "=&r"(t1) : "r"(a) : "memory");
    (void)t1;
    return fails;
}

static void __attribute__((noinline)) atomics_hot(void) {
    u64 fails = 0;
    atomic_cells[0] = 0;
    atomic_cells[1] = 0xFFFFFFFF80000000UL;
    for (u64 i = 0; i < 40; i++) {
        fails += atomic_round(i);
        u64 *w = &atomic_cells[1];
        u64 old;
        asm volatile("amoadd.w %0, %1, (%2)" : "=r"(old) : "r"(-1L), "r"(w) : "memory");
        CHECK_EQ(old, (u64)(int64_t)(int32_t)(0x80000000U - (u32)i));
        asm volatile("amomin.d %0, %1, (%2)" : "=r"(old) : "r"((u64)-(int64_t)i), "r"(&atomic_cells[2]) : "memory");
        asm volatile("amomaxu.d %0, %1, (%2)" : "=r"(old) : "r"(i * 3), "r"(&atomic_cells[3]) : "memory");
    }
    CHECK_EQ(atomic_cells[0], 40);
    CHECK_EQ(fails, 40);
    CHECK_EQ(atomic_cells[1] & 0xFFFFFFFF, 0x80000000U - 40);
    CHECK_EQ(atomic_cells[2], (u64)-39L);
    CHECK_EQ(atomic_cells[3], 39 * 3);
}

int main(void) {
    setup_machine();
    atomics_hot();
    machine_exceptions();
    machine_misc();
    lower_modes();
    xret_status();
    return failures;
}
