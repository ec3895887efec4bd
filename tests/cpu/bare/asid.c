/* Address spaces (satp.ASID), global mappings (PTE.G), sfence.vma with rs1 and rs2, and Sstc.
 *
 * Two Sv39 address spaces, ASIDs 1 and 2, map the same virtual pages to different physical
 * ones; both map the code and data 1:1 through a global 1 GiB page and share one global 4 KiB
 * page.  Architectural checks run everywhere; checks that an entry was *kept* (which the
 * specification allows but does not require) run on pyvirt only: they show that a satp write
 * or an sfence.vma naming something else does not drop it. */
#include "bare.h"

#define V 1UL
#define R 2UL
#define W 4UL
#define X 8UL
#define G 32UL
#define A 64UL
#define D 128UL
#define PTE(pa, f) ((((u64)(pa)) >> 12) << 10 | (f))
#define VA(i) (0x40000000UL + 4096UL * (i))
#define STCE (1UL << 63)
#define STIP (1UL << IRQ_STI)

static int qemu;                                     /* on_qemu(), read in M-mode */
static u64 pt[6][512] __attribute__((aligned(4096)));
static volatile u64 pages[4][512] __attribute__((aligned(4096)));
extern char lower_stack_top[];

/* Two pages of code mapped at the same virtual page in the two address spaces. */
asm(".pushsection .text.codea, \"ax\"\n.balign 4096\n.globl code_a\ncode_a: li a0, 1\n ret\n.popsection\n"
    ".pushsection .text.codeb, \"ax\"\n.balign 4096\n.globl code_b\ncode_b: li a0, 2\n ret\n.popsection\n");
extern char code_a[], code_b[];

/* pt[0] / pt[1]: roots of ASIDs 1 / 2; pt[2] / pt[3]: their L1 tables; pt[4] / pt[5]: L0. */
static u64 *l0a = pt[4], *l0b = pt[5];
static u64 satp_a(void) { return (8UL << 60) | (1UL << 44) | ((u64)pt[0] >> 12); }
static u64 satp_b(void) { return (8UL << 60) | (2UL << 44) | ((u64)pt[1] >> 12); }

static void build_tables(void) {
    for (int s = 0; s < 2; s++) {
        pt[s][2] = PTE(0x80000000UL, V | R | W | X | G | A | D);   /* code and data, global */
        pt[s][1] = PTE(pt[2 + s], V);
        pt[2 + s][0] = PTE(pt[4 + s], V);
    }
    l0a[0] = PTE(pages[0], V | R | W | A | D);
    l0b[0] = PTE(pages[1], V | R | W | A | D);
    l0a[1] = l0b[1] = PTE(pages[2], V | R | W | G | A | D);          /* a global page */
    l0a[2] = PTE(code_a, V | R | X | A);
    l0b[2] = PTE(code_b, V | R | X | A);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 512; j++) pages[i][j] = 0x1000000000000000UL * i + j;
}

#define P(i) (0x1000000000000000UL * (i))            /* word 0 of pages[i] */
#define SFENCE_VA_ASID(va, asid) asm volatile("sfence.vma %0, %1" :: "r"(va), "r"(asid) : "memory")
#define SFENCE_ASID(asid) asm volatile("sfence.vma x0, %0" :: "r"(asid) : "memory")
#define SFENCE_VA(va) asm volatile("sfence.vma %0" :: "r"(va) : "memory")
#define SFENCE_ALL() asm volatile("sfence.vma" ::: "memory")
static u64 call_ret(u64 a) {
    register u64 r asm("a0");
    asm volatile("jalr %1" : "=r"(r) : "r"(a) : "ra", "memory");
    return r;
}

static void s_asids(void) {
    int pyvirt = !qemu;
    /* Switching address spaces without a fence: each sees its own pages, global ones the same.
       Often enough for the loop to be translated and its blocks chained. */
    for (int i = 0; i < 40; i++) {
        csrw(satp, satp_a());
        CHECK_EQ(ld64(VA(0)), P(0));
        CHECK_EQ(ld64(VA(1)), P(2));
        CHECK_EQ(call_ret(VA(2)), 1);
        sd64(VA(0) + 8, i);
        csrw(satp, satp_b());
        CHECK_EQ(ld64(VA(0)), P(1));
        CHECK_EQ(ld64(VA(1)), P(2));
        CHECK_EQ(call_ret(VA(2)), 2);
        sd64(VA(0) + 8, 100 + i);
    }
    CHECK_EQ(pages[0][1], 39);
    CHECK_EQ(pages[1][1], 139);
    CHECK_EQ(csrr(satp), satp_b());

    /* A satp write drops nothing: pyvirt keeps each address space's entries. */
    csrw(satp, satp_a());
    ld64(VA(0));
    l0a[0] = PTE(pages[3], V | R | W | A | D);
    csrw(satp, satp_b());
    csrw(satp, satp_a());
    if (pyvirt) CHECK_EQ(ld64(VA(0)), P(0));
    l0a[0] = PTE(pages[0], V | R | W | A | D);
    SFENCE_ASID(1);
    CHECK_EQ(ld64(VA(0)), P(0));

    /* sfence.vma va, asid: only that address space's page. */
    csrw(satp, satp_a());
    ld64(VA(0));
    l0a[0] = PTE(pages[3], V | R | W | A | D);
    l0b[0] = PTE(pages[3], V | R | W | A | D);
    if (pyvirt) CHECK_EQ(ld64(VA(0)), P(0));         /* kept until fenced */
    SFENCE_VA_ASID(VA(0), 2);                         /* the other address space */
    if (pyvirt) CHECK_EQ(ld64(VA(0)), P(0));
    SFENCE_VA_ASID(VA(0), 1);
    CHECK_EQ(ld64(VA(0)), P(3));
    csrw(satp, satp_b());
    CHECK_EQ(ld64(VA(0)), P(3));                      /* fenced above */
    /* sfence.vma x0, asid: all of that address space's pages, from another one. */
    l0a[0] = PTE(pages[0], V | R | W | A | D);
    l0b[0] = PTE(pages[1], V | R | W | A | D);
    SFENCE_ASID(1);
    if (pyvirt) CHECK_EQ(ld64(VA(0)), P(3));         /* ASID 2 kept */
    csrw(satp, satp_a());
    CHECK_EQ(ld64(VA(0)), P(0));
    csrw(satp, satp_b());
    SFENCE_ASID(2);
    CHECK_EQ(ld64(VA(0)), P(1));

    /* Global mappings: kept across satp writes and sfence.vma with rs2 != x0. */
    CHECK_EQ(ld64(VA(1)), P(2));
    l0a[1] = l0b[1] = PTE(pages[3], V | R | W | G | A | D);
    csrw(satp, satp_a());
    SFENCE_ASID(1);
    SFENCE_VA_ASID(VA(1), 1);
    if (pyvirt) CHECK_EQ(ld64(VA(1)), P(2));
    SFENCE_VA(VA(1));                                 /* rs2 = x0: global ones too */
    CHECK_EQ(ld64(VA(1)), P(3));
    csrw(satp, satp_b());
    CHECK_EQ(ld64(VA(1)), P(3));
    l0a[1] = l0b[1] = PTE(pages[2], V | R | W | G | A | D);
    SFENCE_ALL();
    CHECK_EQ(ld64(VA(1)), P(2));

    /* A page fault in one address space after its page goes, none in the other. */
    csrw(satp, satp_a());
    ld64(VA(0));
    l0a[0] = 0;
    SFENCE_VA_ASID(VA(0), 1);
    trap_reset();
    ld64(VA(0));
    CHECK_EQ(m_rec.cause, C_LOAD_PAGE);
    CHECK_EQ(m_rec.tval, VA(0));
    trap_reset();
    csrw(satp, satp_b());
    CHECK_EQ(ld64(VA(0)), P(1));
    CHECK_EQ(m_rec.count, 0);
    l0a[0] = PTE(pages[0], V | R | W | A | D);
    SFENCE_ASID(1);

    /* Code: the same virtual page runs different code per address space, and a remap of
       one of them with a fence naming it is seen. */
    csrw(satp, satp_a());
    CHECK_EQ(call_ret(VA(2)), 1);
    l0a[2] = PTE(code_b, V | R | X | A);
    SFENCE_VA_ASID(VA(2), 1);
    CHECK_EQ(call_ret(VA(2)), 2);
    l0a[2] = PTE(code_a, V | R | X | A);
    SFENCE_ASID(1);
    CHECK_EQ(call_ret(VA(2)), 1);
    lower_exit(0);
}

/* Sstc, from S: stimecmp drives STIP; the timer interrupt is taken when enabled. */
static void s_sstc(void) {
    asm volatile("csrw 0x14d, %0" :: "r"(0UL));
    CHECK_EQ(csrr(sip) & STIP, STIP);                 /* time >= 0 */
    asm volatile("csrw 0x14d, %0" :: "r"(-1UL));
    CHECK_EQ(csrr(sip) & STIP, 0);
    u64 now = csrr(time);
    asm volatile("csrw 0x14d, %0" :: "r"(now + 100000));   /* 10 ms at 10 MHz */
    u64 cmp;
    asm volatile("csrr %0, 0x14d" : "=r"(cmp));
    CHECK_EQ(cmp, now + 100000);
    CHECK_EQ(csrr(sip) & STIP, 0);
    int seen = 0;
    while (csrr(time) < now + 20000000) {             /* up to 2 s */
        if (csrr(sip) & STIP) { seen = 1; break; }
    }
    CHECK(seen);
    CHECK(csrr(time) >= now + 100000);
    CHECK_EQ(s_irqs[IRQ_STI], 0);
    csrs(sie, STIP);
    csrs(sstatus, MS_SIE);
    asm volatile("nop");
    CHECK_EQ(s_irqs[IRQ_STI], 1);                     /* taken (the handler clears sie.STIE) */
    csrc(sstatus, MS_SIE);
    asm volatile("csrw 0x14d, %0" :: "r"(-1UL));
    CHECK_EQ(csrr(sip) & STIP, 0);
    lower_exit(0);
}

static void s_read_stimecmp(void) {
    u64 v;
    asm volatile(".option push\n.option norvc\ncsrr %0, 0x14d\n.option pop" : "=r"(v) :: "memory");
    lower_exit(v);
}

int main(void) {
    setup_machine();
    qemu = on_qemu();
    build_tables();
    /* ASIDLEN: every ASID bit is writable. */
    csrw(satp, satp_a() | (0xFFFFUL << 44));
    CHECK_EQ((csrr(satp) >> 44) & 0xFFFF, 0xFFFF);
    csrw(satp, satp_a());
    SFENCE_ALL();
    enter_mode(PRV_S, (u64)s_asids, 0, (u64)lower_stack_top);
    csrw(satp, 0);
    SFENCE_ALL();

    /* Sstc.  Without menvcfg.STCE, S may not touch stimecmp. */
    csrw(menvcfg, 0);
    trap_reset();
    enter_mode(PRV_S, (u64)s_read_stimecmp, 0, (u64)lower_stack_top);
    CHECK_EQ(m_rec.cause, C_ILLEGAL);
    csrw(menvcfg, STCE);
    /* QEMU's spike machine takes menvcfg.STCE but its stimecmp does not work (no rdtime). */
    if (!qemu) {
        CHECK(csrr(menvcfg) & STCE);
        /* Nor without mcounteren.TM. */
        csrw(mcounteren, 5);
        trap_reset();
        enter_mode(PRV_S, (u64)s_read_stimecmp, 0, (u64)lower_stack_top);
        CHECK_EQ(m_rec.cause, C_ILLEGAL);
        csrw(mcounteren, 7);
        /* With STCE, mip.STIP is the comparator's: M cannot clear it. */
        asm volatile("csrw 0x14d, %0" :: "r"(0UL));
        csrc(mip, STIP);
        CHECK_EQ(csrr(mip) & STIP, STIP);
        csrw(mideleg, STIP);
        trap_reset();
        enter_mode(PRV_S, (u64)s_sstc, 0, (u64)lower_stack_top);
        CHECK_EQ(m_rec.count, 0);
        csrw(mideleg, 0);
    }
    csrw(menvcfg, 0);
    return failures;
}
