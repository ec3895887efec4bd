/* Software and timer interrupts through mip/mie: delegation to S, global enables per mode,
 * priority, vectored xtvec, xepc of an interrupt taken right after the enabling CSR write,
 * WFI with a pending interrupt. */
#include "bare.h"

#define SSIP (1UL << IRQ_SSI)
#define STIP (1UL << IRQ_STI)
#define SITE(name, insn) ".option push\n.option norvc\n.globl " #name "\n" #name ": " insn "\n.option pop\n"
extern char lower_stack_top[], s_sie_site[], s_after_sie[], m_mie_site[], m_after_mie[],
    s_wfi_site[], m_wfi_site[], u_spin[], u_spin_after[];

static void irq_reset(void) {
    trap_reset();
    for (int i = 0; i < 16; i++) { m_irqs[i] = s_irqs[i] = 0; irq_log[i] = 0; s_vec_hits[i] = m_vec_hits[i] = 0; }
    irq_log_n = 0;
}

static u64 run(u64 mode, void (*fn)(void), u64 arg) {
    return enter_mode(mode, (u64)fn, arg, (u64)lower_stack_top);
}

/* S: raise SSIP itself, see it held while SIE = 0, taken right after SIE is set. */
static void s_soft(void) {
    csrs(sie, SSIP);
    csrs(sip, SSIP);
    CHECK_EQ(csrr(sip) & SSIP, SSIP);
    for (volatile int i = 0; i < 10; i++) {}
    CHECK_EQ(s_irqs[IRQ_SSI], 0);
    asm volatile("li t0, 2\n" SITE(s_sie_site, "csrs sstatus, t0") SITE(s_after_sie, "nop") ::: "t0", "memory");
    CHECK_EQ(s_irqs[IRQ_SSI], 1);
    CHECK_EQ(s_rec.cause, INTERRUPT | IRQ_SSI);
    CHECK_EQ(s_rec.epc, (u64)s_after_sie);
    CHECK_EQ(s_rec.status & MS_SPIE, MS_SPIE);     /* SIE was 1 when it was taken */
    CHECK_EQ(s_rec.status & MS_SPP, MS_SPP);       /* from S */
    CHECK_EQ(csrr(sip) & SSIP, 0);                 /* the handler cleared it */
    CHECK(csrr(sstatus) & MS_SIE);                 /* sret restored SIE */
    csrc(sstatus, MS_SIE);
    lower_exit(0);
}

/* S: STIP (raised by M) and SSIP both pending: SSI is taken first, then STI. */
static void s_both(void) {
    csrs(sip, SSIP);
    CHECK_EQ(csrr(sip) & (SSIP | STIP), SSIP | STIP);
    CHECK_EQ(irq_log_n, 0);
    csrs(sstatus, MS_SIE);
    asm volatile("nop");
    CHECK_EQ(irq_log_n, 2);
    CHECK_EQ(irq_log[0], 0x100 | IRQ_SSI);
    CHECK_EQ(irq_log[1], 0x100 | IRQ_STI);
    csrc(sstatus, MS_SIE);
    /* STIP is read-only in sip: S asks M to clear it. */
    asm volatile("li a7, %0\necall" :: "i"(SVC_CLEAR_STIP) : "a7", "memory");
    CHECK_EQ(csrr(sip) & STIP, 0);
    lower_exit(0);
}

/* S: WFI returns with an interrupt pending (even with SIE = 0); then SIE takes it. */
static void s_wfi(void) {
    csrs(sip, SSIP);
    asm volatile(SITE(s_wfi_site, "wfi") ::: "memory");
    CHECK_EQ(s_irqs[IRQ_SSI], 0);
    csrs(sstatus, MS_SIE);
    asm volatile("nop");
    CHECK_EQ(s_irqs[IRQ_SSI], 1);
    csrc(sstatus, MS_SIE);
    lower_exit(0);
}

/* S: writes to sip.SSIP do nothing when SSI is not delegated; sie/sip show delegated bits only. */
static void s_not_delegated(void) {
    csrs(sip, SSIP);
    CHECK_EQ(csrr(sip), 0);
    CHECK_EQ(csrr(sie), 0);
    lower_exit(0);
}

static void s_nothing(void) { lower_exit(0x77); }

/* U code: a short loop, interrupted on entry when an S interrupt is pending. */
asm(".option push\n.option norvc\n.globl u_spin\nu_spin:\n li t0, 5\n1: addi t0, t0, -1\n bnez t0, 1b\n"
    ".globl u_spin_after\nu_spin_after: li a0, 0x99\n li a7, 0x5EC0DE\n ecall\n.option pop\n");

int main(void) {
    setup_machine();

    /* 1. Delegated SSI in S, held by SIE = 0, taken after the enabling csrs (sepc = next). */
    irq_reset();
    csrw(mideleg, SSIP | STIP);
    csrw(mie, 0);
    csrc(mstatus, MS_SIE);
    run(PRV_S, s_soft, 0);
    CHECK_EQ(m_rec.count, 0);

    /* 2. Priority SSI before STI; STIP raised by M. */
    irq_reset();
    csrw(mie, SSIP | STIP);
    csrs(mip, STIP);
    CHECK_EQ(csrr(mip) & STIP, STIP);
    run(PRV_S, s_both, 0);
    CHECK_EQ(csrr(mip) & (SSIP | STIP), 0);

    /* 3. Vectored stvec: interrupt i enters at base + 4 * i. */
    irq_reset();
    csrw(stvec, (u64)s_vector_table | 1);
    csrw(mie, SSIP | STIP);
    csrs(mip, STIP);
    run(PRV_S, s_both, 0);
    CHECK_EQ(s_vec_hits[IRQ_SSI], 1);
    CHECK_EQ(s_vec_hits[IRQ_STI], 1);
    CHECK_EQ(s_vec_hits[15], 0);
    csrw(stvec, (u64)s_trap_entry);

    /* 4. WFI with a pending interrupt. */
    irq_reset();
    csrw(mie, SSIP);
    run(PRV_S, s_wfi, 0);
    CHECK_EQ(s_irqs[IRQ_SSI], 1);
    irq_reset();
    csrs(mip, SSIP);                           /* M, MIE = 0: WFI returns, nothing taken */
    asm volatile(SITE(m_wfi_site, "wfi") ::: "memory");
    CHECK_EQ(m_irqs[IRQ_SSI] + s_irqs[IRQ_SSI], 0);
    csrc(mip, SSIP);

    /* 5. A delegated S interrupt pending while in U is taken in S even with SIE = 0. */
    irq_reset();
    csrw(mie, SSIP);
    csrs(mip, SSIP);
    csrc(mstatus, MS_SIE);
    CHECK_EQ(enter_mode(PRV_U, (u64)u_spin, 0, (u64)lower_stack_top), 0x99);
    CHECK_EQ(s_irqs[IRQ_SSI], 1);
    CHECK_EQ(s_rec.epc, (u64)u_spin);
    CHECK_EQ(s_rec.status & MS_SPP, 0);
    /* ...but never in M, whatever MIE says. */
    irq_reset();
    csrs(mip, SSIP);
    csrs(mstatus, MS_MIE);
    asm volatile("nop\nnop");
    csrc(mstatus, MS_MIE);
    CHECK_EQ(m_irqs[IRQ_SSI] + s_irqs[IRQ_SSI], 0);
    csrc(mip, SSIP);

    /* 6. Not delegated: pending SSI goes to M as soon as M drops to S, whatever MIE says. */
    irq_reset();
    csrw(mideleg, 0);
    csrw(mie, SSIP);
    csrs(mip, SSIP);
    CHECK_EQ(run(PRV_S, s_nothing, 0), 0x77);
    CHECK_EQ(m_irqs[IRQ_SSI], 1);
    CHECK_EQ(m_rec.cause, INTERRUPT | IRQ_SSI);
    CHECK_EQ(m_rec.epc, (u64)s_nothing);
    CHECK_EQ((m_rec.status & MS_MPP) >> 11, PRV_S);
    irq_reset();
    csrw(mie, 0);
    run(PRV_S, s_not_delegated, 0);
    CHECK_EQ(csrr(mip) & SSIP, 0);

    /* 7. In M: taken right after MIE is set, in priority order, through a vectored mtvec. */
    irq_reset();
    csrw(mtvec, (u64)m_vector_table | 1);
    csrw(mie, SSIP | STIP);
    csrs(mip, STIP | SSIP);
    CHECK_EQ(irq_log_n, 0);
    asm volatile("li t0, 8\n" SITE(m_mie_site, "csrs mstatus, t0") SITE(m_after_mie, "nop") ::: "t0", "memory");
    csrc(mstatus, MS_MIE);
    CHECK_EQ(irq_log_n, 2);
    CHECK_EQ(irq_log[0], IRQ_SSI);
    CHECK_EQ(irq_log[1], IRQ_STI);
    CHECK_EQ(m_vec_hits[IRQ_SSI], 1);
    CHECK_EQ(m_vec_hits[IRQ_STI], 1);
    CHECK_EQ(m_vec_hits[15], 0);
    CHECK_EQ(m_rec.cause, INTERRUPT | IRQ_STI);
    CHECK_EQ(m_rec.epc, (u64)m_after_mie);
    csrw(mtvec, (u64)m_trap_entry);
    csrw(mie, 0);
    return failures;
}
