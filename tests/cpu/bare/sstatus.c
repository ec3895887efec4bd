/* sstatus read-modify-write and LR/SC from S-mode in loops hot enough to be translated:
 * every csrrw/csrrs/csrrc form (register and immediate) on sstatus, sscratch, sepc, scause, stval (old value, SD/FS/UXL as read, WARL bits), SIE set with
 * an interrupt pending taken right after the write, and reservations kept, broken and
 * consumed exactly. */
#include "bare.h"

#define SSIP (1UL << IRQ_SSI)
#define ROUNDS 64
#define SITE(name, insn) ".option push\n.option norvc\n.globl " #name "\n" #name ": " insn "\n.option pop\n"
extern char lower_stack_top[], s_loop_sie[], s_loop_after[];

static volatile u64 cell[4] __attribute__((aligned(16)));
static volatile u64 even;          /* sepc's write mask, set in M (marchid is M-only) */

static u64 csrrci_sie(void) { u64 v; asm volatile("csrrci %0, sstatus, 2" : "=r"(v) :: "memory"); return v; }
static u64 csrrsi_sie(void) { u64 v; asm volatile("csrrsi %0, sstatus, 2" : "=r"(v) :: "memory"); return v; }
static u64 csrrs_r(u64 s) { u64 v; asm volatile("csrrs %0, sstatus, %1" : "=r"(v) : "r"(s) : "memory"); return v; }
static u64 csrrc_r(u64 s) { u64 v; asm volatile("csrrc %0, sstatus, %1" : "=r"(v) : "r"(s) : "memory"); return v; }
static u64 csrrw_r(u64 s) { u64 v; asm volatile("csrrw %0, sstatus, %1" : "=r"(v) : "r"(s) : "memory"); return v; }

static u64 lr_d(volatile u64 *a) { u64 v; asm volatile("lr.d %0, (%1)" : "=r"(v) : "r"(a) : "memory"); return v; }
static u64 sc_d(volatile u64 *a, u64 x) { u64 r; asm volatile("sc.d %0, %2, (%1)" : "=&r"(r) : "r"(a), "r"(x) : "memory"); return r; }
static u64 lr_w(volatile u64 *a) { u64 v; asm volatile("lr.w %0, (%1)" : "=r"(v) : "r"(a) : "memory"); return v; }
static u64 sc_w(volatile u64 *a, u64 x) { u64 r; asm volatile("sc.w %0, %2, (%1)" : "=&r"(r) : "r"(a), "r"(x) : "memory"); return r; }

static void s_csr_loop(void) {
    u64 base = csrr(sstatus);
    CHECK_EQ(base & MS_SIE, 0);
    CHECK_EQ(base & MS_FS, 1UL << 13);             /* Initial, so SD reads 0 */
    CHECK_EQ(base & MS_SD, 0);
    CHECK_EQ((base >> 32) & 3, 2);                 /* UXL = 64 */
    for (int i = 0; i < ROUNDS; i++) {
        CHECK_EQ(csrrsi_sie(), base);              /* irq enable: returns the old value */
        CHECK_EQ(csrr(sstatus), base | MS_SIE);
        CHECK_EQ(csrrci_sie(), base | MS_SIE);     /* irq save */
        CHECK_EQ(csrr(sstatus), base);
        CHECK_EQ(csrrs_r(MS_SIE), base);           /* irq restore */
        CHECK_EQ(csrrc_r(MS_SIE | MS_MIE), base | MS_SIE);   /* MIE is not an sstatus bit */
        CHECK_EQ(csrr(sstatus), base);
        /* FS dirty: SD reads 1; writing SD, UXL or M bits changes nothing. */
        CHECK_EQ(csrrs_r(MS_FS), base);
        CHECK_EQ(csrr(sstatus), (base | MS_FS | MS_SD));
        CHECK_EQ(csrrw_r(base | MS_MPP | MS_MIE | (1UL << 34)), base | MS_FS | MS_SD);
        CHECK_EQ(csrr(sstatus), base);
        /* SUM on and off (the TLB rules change: not only SIE). */
        CHECK_EQ(csrrs_r(MS_SUM), base);
        CHECK_EQ(csrrc_r(MS_SUM), base | MS_SUM);
        CHECK_EQ(csrr(sstatus), base);
        /* Stored-only CSRs: the old value back, sepc's bit 0 always clear. */
        u64 v = 0x8000000000001235UL + i, old;
        csrw(sscratch, v);
        asm volatile("csrrw %0, sscratch, %1" : "=r"(old) : "r"(~v) : "memory");
        CHECK_EQ(old, v);
        asm volatile("csrrc %0, sscratch, %1" : "=r"(old) : "r"(0xFFUL) : "memory");
        CHECK_EQ(old, ~v);
        asm volatile("csrrsi %0, sscratch, 5" : "=r"(old) :: "memory");
        CHECK_EQ(old, ~v & ~0xFFUL);
        CHECK_EQ(csrr(sscratch), (~v & ~0xFFUL) | 5);
        /* sepc[0] is always zero (priv. spec 4.1.7); QEMU 7.2 keeps the bit. */
        asm volatile("csrrw %0, sepc, %1" : "=r"(old) : "r"(v) : "memory");
        CHECK_EQ(csrr(sepc), v & even);
        asm volatile("csrrwi %0, sepc, 7" : "=r"(old) :: "memory");
        CHECK_EQ(old, v & even);
        CHECK_EQ(csrr(sepc), 7 & even);
        csrw(scause, v);
        csrw(stval, ~v);
        CHECK_EQ(csrr(scause), v);
        CHECK_EQ(csrr(stval), ~v);
    }
    lower_exit(0);
}

/* The pending SSI is taken right after the SIE-setting write, in the last round only. */
static void s_irq_loop(void) {
    csrs(sie, SSIP);
    for (int i = 0; i < ROUNDS; i++) {
        if (i == ROUNDS - 1)
            csrs(sip, SSIP);
        asm volatile("li t0, 2\n" SITE(s_loop_sie, "csrs sstatus, t0") SITE(s_loop_after, "nop") ::: "t0", "memory");
        CHECK_EQ(s_irqs[IRQ_SSI], i == ROUNDS - 1 ? 1 : 0);
        csrc(sstatus, MS_SIE);
    }
    CHECK_EQ(s_rec.epc, (u64)s_loop_after);
    CHECK_EQ(s_rec.cause, INTERRUPT | IRQ_SSI);
    lower_exit(0);
}

static void s_lrsc_loop(void) {
    for (int i = 0; i < ROUNDS; i++) {
        cell[0] = i;
        CHECK_EQ(lr_d(&cell[0]), (u64)i);
        CHECK_EQ(sc_d(&cell[0], i + 100), 0);          /* reservation held: succeeds */
        CHECK_EQ(cell[0], (u64)i + 100);
        CHECK_EQ(sc_d(&cell[0], 7), 1);                /* consumed: fails, no store */
        CHECK_EQ(cell[0], (u64)i + 100);
        lr_d(&cell[0]);
        CHECK_EQ(sc_d(&cell[2], 9), 1);                /* another address: fails */
        CHECK_EQ(cell[2], 0);
        CHECK_EQ(sc_d(&cell[0], 9), 1);                /* ...and the failed sc cleared it */
        cell[1] = 0xFFFFFFFF80000000UL | i;
        CHECK_EQ(lr_w(&cell[1]), 0xFFFFFFFF80000000UL | i);  /* sign-extended */
        CHECK_EQ(sc_w(&cell[1], 0x12345678), 0);
        CHECK_EQ(cell[1], 0xFFFFFFFF12345678UL);       /* only the low word written */
    }
    lower_exit(0);
}

int main(void) {
    setup_machine();
    even = on_qemu() ? ~0UL : ~1UL;
    csrw(mideleg, SSIP);
    csrw(mie, 0);
    csrc(mstatus, MS_SIE | MS_SUM);
    CHECK_EQ(enter_mode(PRV_S, (u64)s_csr_loop, 0, (u64)lower_stack_top), 0);
    csrw(mie, SSIP);
    trap_reset();
    CHECK_EQ(enter_mode(PRV_S, (u64)s_irq_loop, 0, (u64)lower_stack_top), 0);
    CHECK_EQ(s_irqs[IRQ_SSI], 1);
    csrw(mie, 0);
    CHECK_EQ(enter_mode(PRV_S, (u64)s_lrsc_loop, 0, (u64)lower_stack_top), 0);
    return failures;
}
