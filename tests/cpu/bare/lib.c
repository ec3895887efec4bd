/* Trap handlers and reporting for the bare-metal CPU tests (see bare.h). */
#include "bare.h"

struct trap_record m_rec, s_rec;
volatile u64 m_resume, s_resume;
volatile u64 m_irqs[16], s_irqs[16];
volatile u64 irq_log[16], irq_log_n;      /* interrupts in the order taken: cause | 0x100 in S */
int failures;
u64 last_frame[32];                        /* registers at the last exception taken to M */

void m_longjmp(u64 value) __attribute__((noreturn));

void puts_(const char *s) { while (*s) htif_putchar(*s++); }

void put_hex(u64 v) {
    puts_("0x");
    for (int i = 60; i >= 0; i -= 4) htif_putchar("0123456789abcdef"[(v >> i) & 15]);
}

void put_dec(u64 v) {
    char buf[24];
    int n = 0;
    do { buf[n++] = '0' + v % 10; v /= 10; } while (v);
    while (n) htif_putchar(buf[--n]);
}

void check_failed(int line, const char *what, u64 a, u64 b) {
    failures++;
    puts_("FAIL line ");
    put_dec(line);
    puts_(": ");
    puts_(what);
    if (a != b) { puts_(" ("); put_hex(a); puts_(" vs "); put_hex(b); puts_(")"); }
    puts_("\n");
}

int on_qemu(void) { return csrr(marchid) != 0; }

void trap_reset(void) {
    m_rec.count = 0; m_rec.cause = NO_TRAP; m_rec.epc = 0; m_rec.tval = 0;
    s_rec.count = 0; s_rec.cause = NO_TRAP; s_rec.epc = 0; s_rec.tval = 0;
}

extern char m_trap_stack_top[], s_trap_stack_top[];

void setup_machine(void) {
    csrw(mtvec, (u64)m_trap_entry);
    csrw(mscratch, (u64)m_trap_stack_top);
    csrw(stvec, (u64)s_trap_entry);
    csrw(sscratch, (u64)s_trap_stack_top);
    /* All of memory open to S and U through PMP entry 0 (NAPOT, RWX), as firmware does. */
    csrw(pmpaddr0, -1UL >> 10);
    csrw(pmpcfg0, 0x1f);
    csrw(mcounteren, 7);
    csrw(scounteren, 7);
    csrs(mstatus, 1UL << 13);       /* FS = Initial */
    trap_reset();
}

static void record(struct trap_record *r, u64 cause, u64 epc, u64 tval, u64 status, u64 a7) {
    r->count++;
    r->cause = cause;
    r->epc = epc;
    r->tval = tval;
    r->status = status;
    r->a7 = a7;
}

/* frame: x0..x31 as saved by the entry (frame[2] = the interrupted sp). */
void m_trap_c(u64 *frame) {
    u64 cause = csrr(mcause), epc = csrr(mepc), tval = csrr(mtval), status = csrr(mstatus);
    if (cause & INTERRUPT) {
        u64 code = cause & 15;
        m_irqs[code]++;
        if (irq_log_n < 16) irq_log[irq_log_n++] = code;
        record(&m_rec, cause, epc, tval, status, frame[17]);
        /* Silence the source so the handler is not re-entered. */
        csrc(mip, 1UL << code);
        csrc(mie, 1UL << code);
        return;
    }
    if ((cause == C_ECALL_U || cause == C_ECALL_S) && frame[17] == EXIT_MAGIC)
        m_longjmp(frame[10]);
    record(&m_rec, cause, epc, tval, status, frame[17]);
    for (int i = 0; i < 32; i++) last_frame[i] = frame[i];
    if (cause == C_ECALL_S && frame[17] == SVC_CLEAR_STIP) csrc(mip, 1UL << IRQ_STI);
    if (cause == C_ECALL_S && frame[17] == SVC_SET_STIP) csrs(mip, 1UL << IRQ_STI);
    if (m_resume) {
        csrw(mepc, m_resume);
        m_resume = 0;
    } else {
        csrw(mepc, epc + 4);
    }
}

void s_trap_c(u64 *frame) {
    u64 cause = csrr(scause), epc = csrr(sepc), tval = csrr(stval), status = csrr(sstatus);
    if (cause & INTERRUPT) {
        u64 code = cause & 15;
        s_irqs[code]++;
        if (irq_log_n < 16) irq_log[irq_log_n++] = code | 0x100;
        record(&s_rec, cause, epc, tval, status, frame[17]);
        if (code == IRQ_SSI) csrc(sip, 1UL << IRQ_SSI);
        else csrc(sie, 1UL << code);
        return;
    }
    if (cause == C_ECALL_U && frame[17] == EXIT_MAGIC)
        lower_exit(frame[10]);           /* U is done: pass the value on to M */
    record(&s_rec, cause, epc, tval, status, frame[17]);
    if (s_resume) {
        csrw(sepc, s_resume);
        s_resume = 0;
    } else {
        csrw(sepc, epc + 4);
    }
}
