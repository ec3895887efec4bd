/* mtval of illegal-instruction traps raised while executing an instruction that decodes fine:
 * privilege and CSR checks, trap-virtualisation bits, reserved rounding modes, FS = Off.
 * mtval must hold the instruction bits (as for undecodable instructions). */
#include "bare.h"

extern char lower_stack_top[];

static u64 probe(u64 which) {
    switch (which) {
    case 0: { u64 v; asm volatile(".option push\n.option norvc\ncsrr %0, mstatus\n.option pop" : "=r"(v) :: "memory"); break; }
    case 1: asm volatile(".option push\n.option norvc\nmret\n.option pop" ::: "memory"); break;
    case 2: asm volatile(".option push\n.option norvc\nwfi\n.option pop" ::: "memory"); break;
    case 3: asm volatile(".option push\n.option norvc\nsret\n.option pop" ::: "memory"); break;
    case 4: asm volatile(".option push\n.option norvc\nsfence.vma\n.option pop" ::: "memory"); break;
    case 5: asm volatile(".option push\n.option norvc\ncsrw cycle, zero\n.option pop" ::: "memory"); break;
    case 6: { u64 v; asm volatile(".option push\n.option norvc\ncsrr %0, 0x7c0\n.option pop" : "=r"(v) :: "memory"); break; }
    case 7: asm volatile(".option push\n.option norvc\nfsrmi 5\nfadd.d f1, f2, f3\n.option pop" ::: "memory"); break;
    case 8: asm volatile(".option push\n.option norvc\n.word 0x0220d0d3\n.option pop" ::: "memory"); break;  /* rm 5 */
    case 9: { u64 v; asm volatile(".option push\n.option norvc\ncsrr %0, satp\n.option pop" : "=r"(v) :: "memory"); break; }
    case 10: { u64 v; asm volatile(".option push\n.option norvc\nrdcycle %0\n.option pop" : "=r"(v) :: "memory"); break; }
    }
    return which;
}

static const u64 mode_of[] = {PRV_S, PRV_S, PRV_U, PRV_U, PRV_U, PRV_S, PRV_S, PRV_S, PRV_S, PRV_S, PRV_U};

int main(void) {
    setup_machine();
    csrs(mstatus, MS_TVM);
    csrw(scounteren, 0);
    for (u64 i = 0; i < sizeof mode_of / sizeof mode_of[0]; i++) {
        trap_reset();
        enter_mode(mode_of[i], (u64)probe, i, (u64)lower_stack_top);
        CHECK_EQ(m_rec.cause, C_ILLEGAL);
        u32 insn = *(volatile u32 *)m_rec.epc;
        if (m_rec.tval != insn) {
            puts_("case ");
            put_dec(i);
            puts_(": ");
        }
        CHECK_EQ(m_rec.tval, insn);
    }
    csrc(mstatus, MS_TVM);
    /* FS = Off, in M */
    csrc(mstatus, MS_FS);
    trap_reset();
    asm volatile(".option push\n.option norvc\nfmv.x.d t0, f1\n.option pop" ::: "t0", "memory");
    CHECK_EQ(m_rec.tval, *(volatile u32 *)m_rec.epc);
    return failures;
}
