/* Sv39 / Sv48 paging (SATP_MODE 8 or 9): identity and remapped pages, 2 MiB / 1 GiB (/ 512 GiB)
 * superpages, permissions (R/W/X, U with SUM, MXR), page faults with stval, hardware A/D
 * updates, sfence.vma after PTE changes, satp WARL, MPRV, access faults after translation. */
#include "bare.h"

#ifndef SATP_MODE
#define SATP_MODE 8
#endif

#define V 1UL
#define R 2UL
#define W 4UL
#define X 8UL
#define U 16UL
#define A 64UL
#define D 128UL
#define PTE(pa, f) ((((u64)(pa)) >> 12) << 10 | (f))
#define VA(i) (0x40000000UL + 4096UL * (i))
#define SUPER2M 0x40200000UL
#define SUPER2M_PA 0x83E00000UL
#define BAD2M 0x40400000UL
#define MIDWALK 0x40600000UL            /* its level-1 PTE points to a table but is not valid */
#define HOLE 0x10000000UL

static u64 pt[8][512] __attribute__((aligned(4096)));
static volatile u64 pages[8][512] __attribute__((aligned(4096)));
static u64 *l0;
extern char u_page[], u_load[], u_store[], u_jump[], u_exit[], s_ret_stub[], lower_stack_top[];
#define UCODE(sym) (VA(8) + ((u64)(sym) - (u64)u_page))
#define SALIAS(sym) (VA(12) + ((u64)(sym) - (u64)u_page))

/* Code for U mode (and an S-mode `ret` reached through an alias), in a page of its own. */
asm(".pushsection .text.user, \"ax\"\n.balign 4096\n.option push\n.option norvc\n"
    ".globl u_page\nu_page:\n"
    ".globl u_load\nu_load: ld a0, 0(a0)\n j u_exit\n"
    ".globl u_store\nu_store: sd a1, 0(a0)\n li a0, 1\n j u_exit\n"
    ".globl u_jump\nu_jump: jalr ra, 0(a0)\n"
    ".globl u_exit\nu_exit: li a7, 0x5EC0DE\n ecall\n"
    ".globl s_ret_stub\ns_ret_stub: ret\n"
    ".option pop\n.popsection\n");

/* Two pages of code that the same virtual page is switched between. */
asm(".pushsection .text.codea, \"ax\"\n.balign 4096\n.globl code_a\ncode_a: li a0, 1\n ret\n.popsection\n"
    ".pushsection .text.codeb, \"ax\"\n.balign 4096\n.globl code_b\ncode_b: li a0, 2\n ret\n.popsection\n");
extern char code_a[], code_b[];
/* A 32-bit `addi a0, a0, k` straddling two pages: its low half ends code_c's first page; the
   upper half (k) comes from whichever page the next virtual page maps: 1 or 5. */
asm(".pushsection .text.codec, \"ax\"\n.balign 4096\n.globl code_c\ncode_c:\n.rept 2047\nc.nop\n.endr\n"
    ".hword 0x0513\n.hword 0x0015\nret\n.popsection\n"
    ".pushsection .text.coded, \"ax\"\n.balign 4096\n.globl code_d\ncode_d: .hword 0x0055\nret\n.popsection\n");
extern char code_c[], code_d[];

static u64 satp_value(void) { return ((u64)SATP_MODE << 60) | ((u64)pt[0] >> 12); }

static void build_tables(void) {
    u64 *top = pt[0];
    u64 *l2 = top;                       /* the table indexed by VA[38:30] */
    if (SATP_MODE == 9) {
        l2 = pt[4];
        top[0] = PTE(l2, V);
        top[1] = PTE(0, V | R | W | A | D);                   /* 512 GiB page at 0x80_0000_0000 */
    }
    l2[2] = PTE(0x80000000UL, V | R | W | X | A | D);       /* 1 GiB identity: code and data */
    l2[0] = PTE(0x80000000UL, V | R | W | A | D);           /* 1 GiB alias: VA 0 -> 0x80000000 */
    l2[1] = PTE(pt[1], V);
    u64 *l1 = pt[1];
    l1[0] = PTE(pt[2], V);
    l1[1] = PTE(SUPER2M_PA, V | R | W | A | D);             /* 2 MiB page */
    l1[2] = PTE(SUPER2M_PA + 0x1000, V | R | W | A | D);    /* misaligned 2 MiB page */
    l1[3] = PTE(pt[2], 0);                                  /* invalid non-leaf (MIDWALK) */
    l0 = pt[2];
    l0[0] = PTE(pages[0], V | R | W);                       /* A and D clear */
    l0[1] = PTE(pages[1], V | R | A);                       /* read-only */
    l0[2] = PTE(pages[2], V | R | W | A | D);               /* no execute */
    l0[3] = PTE(pages[3], V | R | W | U | A | D);           /* user data */
    l0[4] = PTE(pages[4], V | X | A);                       /* execute-only */
    l0[5] = 0;                                              /* invalid */
    l0[6] = PTE(pages[6], V | W | A | D);                   /* reserved: W without R */
    l0[7] = PTE(pages[5], V | R | W | A | D);               /* remapped later */
    l0[8] = PTE(u_page, V | R | X | U | A);                 /* user code */
    l0[9] = PTE(pages[7], V | R | W | U | A | D);           /* user stack */
    l0[12] = PTE(u_page, V | R | X);                        /* supervisor alias, A clear */
    l0[13] = PTE(pages[3], V | R | U | A);                  /* user, read-only */
    l0[14] = PTE(code_a, V | R | X | A);                    /* code, remapped later */
    l0[15] = PTE(pages[2], V | R | W | A | D);              /* two virtually adjacent pages */
    l0[16] = PTE(pages[0], V | R | W | A | D);              /* in the other physical order */
    l0[18] = PTE(code_c, V | R | X | A);                    /* a straddling instruction */
    l0[19] = PTE(code_c + 4096, V | R | X | A);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 512; j++) pages[i][j] = 0x1000000000000000UL * i + j;
}

#define EXPECT_FAULT(cause_, va_) do { CHECK_EQ(m_rec.cause, cause_); CHECK_EQ(m_rec.tval, va_); \
    trap_reset(); } while (0)
#define EXPECT_NO_FAULT() do { CHECK_EQ(m_rec.count, 0); trap_reset(); } while (0)

static void s_main(void) {
    u64 v;
    /* Hardware A/D updates. */
    trap_reset();
    CHECK_EQ(ld64(VA(0) + 8), 1);
    CHECK_EQ(l0[0] & (A | D), A);
    sd64(VA(0) + 16, 77);
    CHECK_EQ(l0[0] & (A | D), A | D);
    CHECK_EQ(pages[0][2], 77);
    l0[0] &= ~(A | D);
    asm volatile("sfence.vma %0" :: "r"(VA(0)) : "memory");
    sd64(VA(0) + 24, 78);                       /* a store sets both */
    CHECK_EQ(l0[0] & (A | D), A | D);
    call_at(SALIAS(s_ret_stub));                /* a fetch sets A */
    CHECK_EQ(l0[12] & A, A);
    CHECK_EQ(l0[12] & D, 0);
    EXPECT_NO_FAULT();

    /* Permissions: each fault carries the virtual address. */
    CHECK_EQ(ld64(VA(1) + 8), 0x1000000000000001UL);
    sd64(VA(1) + 8, 1);
    EXPECT_FAULT(C_STORE_PAGE, VA(1) + 8);
    amoadd64(VA(1) + 16, 1);
    EXPECT_FAULT(C_STORE_PAGE, VA(1) + 16);
    CHECK_EQ(pages[1][1], 0x1000000000000001UL);
    call_at(VA(2) + 0x40);
    EXPECT_FAULT(C_FETCH_PAGE, VA(2) + 0x40);
    ld64(VA(5));
    EXPECT_FAULT(C_LOAD_PAGE, VA(5));
    sd64(VA(5) + 8, 0);
    EXPECT_FAULT(C_STORE_PAGE, VA(5) + 8);
    call_at(VA(5) + 4);
    EXPECT_FAULT(C_FETCH_PAGE, VA(5) + 4);
    ld64(VA(6));
    EXPECT_FAULT(C_LOAD_PAGE, VA(6));
    sd64(VA(6), 0);
    EXPECT_FAULT(C_STORE_PAGE, VA(6));
    for (int i = 0; i < 3; i++) {               /* a fault in the middle of the walk, each time */
        ld64(MIDWALK + 8);
        EXPECT_FAULT(C_LOAD_PAGE, MIDWALK + 8);
        sd64(MIDWALK + 16, 5);
        EXPECT_FAULT(C_STORE_PAGE, MIDWALK + 16);
    }
    CHECK_EQ(pages[0][2], 77);

    /* U pages from S: only with SUM, never for fetches; SUM takes effect at once. */
    ld64(VA(3));
    EXPECT_FAULT(C_LOAD_PAGE, VA(3));
    csrs(sstatus, MS_SUM);
    CHECK_EQ(ld64(VA(3) + 8), 0x3000000000000001UL);
    sd64(VA(3) + 16, 5);
    CHECK_EQ(pages[3][2], 5);
    call_at(UCODE(s_ret_stub));
    EXPECT_FAULT(C_FETCH_PAGE, UCODE(s_ret_stub));
    csrc(sstatus, MS_SUM);
    ld64(VA(3) + 8);
    EXPECT_FAULT(C_LOAD_PAGE, VA(3) + 8);
    /* ...also in a loop hot enough to be translated, whose blocks chain. */
    for (int i = 0; i < 32; i++) {
        csrs(sstatus, MS_SUM);
        CHECK_EQ(ld64(VA(3) + 8), 0x3000000000000001UL);
        csrc(sstatus, MS_SUM);
        ld64(VA(3) + 8);
        EXPECT_FAULT(C_LOAD_PAGE, VA(3) + 8);
    }

    /* MXR: execute-only pages become readable. */
    ld64(VA(4));
    EXPECT_FAULT(C_LOAD_PAGE, VA(4));
    csrs(sstatus, MS_MXR);
    CHECK_EQ(ld64(VA(4) + 8), 0x4000000000000001UL);
    csrc(sstatus, MS_MXR);
    ld64(VA(4) + 8);
    EXPECT_FAULT(C_LOAD_PAGE, VA(4) + 8);

    /* sfence.vma after PTE changes: remap, unmap, global flush. */
    CHECK_EQ(ld64(VA(7) + 8), 0x5000000000000001UL);
    l0[7] = PTE(pages[6], V | R | W | A | D);
    asm volatile("sfence.vma %0, zero" :: "r"(VA(7)) : "memory");
    CHECK_EQ(ld64(VA(7) + 8), 0x6000000000000001UL);
    l0[7] = 0;
    asm volatile("sfence.vma %0" :: "r"(VA(7)) : "memory");
    ld64(VA(7));
    EXPECT_FAULT(C_LOAD_PAGE, VA(7));
    l0[7] = PTE(pages[5], V | R | W | A | D);
    asm volatile("sfence.vma" ::: "memory");
    CHECK_EQ(ld64(VA(7) + 16), 0x5000000000000002UL);
    l0[7] = PTE(pages[5], V | R | A | D);                   /* write permission taken away */
    asm volatile("sfence.vma zero, zero" ::: "memory");
    sd64(VA(7), 1);
    EXPECT_FAULT(C_STORE_PAGE, VA(7));

    /* Remapping a page of code that has run (and been translated): sfence.vma makes the
       new code visible. */
    u64 (*fn)(void) = (u64 (*)(void))VA(14);
    u64 sum = 0;
    for (int i = 0; i < 5; i++) sum += fn();
    CHECK_EQ(sum, 5);
    l0[14] = PTE(code_b, V | R | X | A);
    asm volatile("sfence.vma %0" :: "r"(VA(14)) : "memory");
    for (int i = 0; i < 5; i++) sum += fn();
    CHECK_EQ(sum, 15);
    l0[14] = PTE(code_a, V | R | X | A);
    asm volatile("sfence.vma" ::: "memory");
    CHECK_EQ(fn(), 1);
    l0[14] = 0;
    asm volatile("sfence.vma" ::: "memory");
    call_at(VA(14));
    EXPECT_FAULT(C_FETCH_PAGE, VA(14));

    /* An instruction straddling two virtual pages: its halves come from wherever they map. */
    u64 (*straddle)(u64) = (u64 (*)(u64))(VA(18) + 0xFFE);
    for (u64 i = 0; i < 4; i++) CHECK_EQ(straddle(i), i + 1);
    l0[19] = PTE(code_d, V | R | X | A);
    asm volatile("sfence.vma %0" :: "r"(VA(19)) : "memory");
    for (u64 i = 0; i < 4; i++) CHECK_EQ(straddle(i), i + 5);
    l0[19] = 0;
    asm volatile("sfence.vma %0" :: "r"(VA(19)) : "memory");
    call_at(VA(18) + 0xFFE);
    CHECK_EQ(m_rec.cause, C_FETCH_PAGE);
    CHECK_EQ(m_rec.epc, VA(18) + 0xFFE);
    CHECK(m_rec.tval == VA(19) || m_rec.tval == VA(18) + 0xFFE);
    trap_reset();

    /* Misaligned accesses across two virtual pages that are not physically adjacent, in a hot
       loop; and into an unmapped page. */
    for (u64 i = 0; i < 20; i++) {
        u64 a = VA(16) - 8 + (i % 8);
        u64 want = (0xA5A5A5A500000000UL | i) * 0x100 + i;
        sd64(a, want);
        CHECK_EQ(ld64(a), want);
        CHECK_EQ(lw32(a + 2), (u32)(want >> 16));
    }
    sd64(VA(16) - 3, 0x0123456789ABCDEFUL);
    CHECK_EQ(pages[2][511] >> 40, 0xABCDEF);                /* the low 3 bytes end page 2 */
    CHECK_EQ(pages[0][0] & 0xFFFFFFFFFFUL, 0x0123456789UL); /* the rest start page 0 */
    EXPECT_NO_FAULT();
    ld64(VA(17) - 4);
    CHECK_EQ(m_rec.cause, C_LOAD_PAGE);
    CHECK(m_rec.tval == VA(17) - 4 || m_rec.tval == VA(17));
    trap_reset();

    /* Superpages. */
    sd64(SUPER2M + 0x1238, 0xABCD);
    CHECK_EQ(ld64(SUPER2M_PA + 0x1238), 0xABCD);
    sd64(SUPER2M + 0x1FFFF8, 0xBCDE);
    CHECK_EQ(ld64(SUPER2M_PA + 0x1FFFF8), 0xBCDE);
    CHECK_EQ(ld64(SUPER2M + 8), ld64(SUPER2M_PA + 8));
    ld64(BAD2M + 8);
    EXPECT_FAULT(C_LOAD_PAGE, BAD2M + 8);
    v = (u64)&pages[2][3];
    CHECK_EQ(ld64(v - 0x80000000UL), 0x2000000000000003UL); /* through the 1 GiB alias */
    ld64(HOLE);                                             /* alias -> 0x90000000: no RAM */
    EXPECT_FAULT(C_LOAD_ACCESS, HOLE);
    if (SATP_MODE == 9)
        CHECK_EQ(ld64(0x8000000000UL + v), 0x2000000000000003UL);   /* 512 GiB page */
    /* Non-canonical and unmapped addresses. */
    v = SATP_MODE == 8 ? 1UL << 38 : 1UL << 47;
    ld64(v);
    EXPECT_FAULT(C_LOAD_PAGE, v);
    sd64(v | 8, 0);
    EXPECT_FAULT(C_STORE_PAGE, v | 8);
    v = -(1UL << 30);                                        /* canonical, top table entry empty */
    ld64(v);
    EXPECT_FAULT(C_LOAD_PAGE, v);

    /* satp: an unsupported mode leaves it unchanged. */
    u64 satp = csrr(satp);
    CHECK_EQ(satp, satp_value());
    for (u64 mode = 1; mode < 16; mode += 2) {
        if (mode == 9) continue;
        csrw(satp, (mode << 60) | 0x12345);
        CHECK_EQ(csrr(satp), satp);
    }
    lower_exit(0);
}

/* Page faults delegated to S: the S handler sees them with stval; M sees nothing. */
static void s_delegated(void) {
    trap_reset();
    ld64(VA(5) + 16);
    CHECK_EQ(s_rec.cause, C_LOAD_PAGE);
    CHECK_EQ(s_rec.tval, VA(5) + 16);
    sd64(VA(1), 3);
    CHECK_EQ(s_rec.cause, C_STORE_PAGE);
    CHECK_EQ(s_rec.tval, VA(1));
    call_at(VA(2) + 8);
    CHECK_EQ(s_rec.cause, C_FETCH_PAGE);
    CHECK_EQ(s_rec.tval, VA(2) + 8);
    CHECK_EQ(s_rec.epc, VA(2) + 8);
    CHECK_EQ(s_rec.count, 3);
    CHECK_EQ(m_rec.count, 0);
    lower_exit(0);
}

static void machine_side(void) {
    u64 v;
    /* U mode under translation. */
    trap_reset();
    CHECK_EQ(enter_mode(PRV_U, UCODE(u_load), VA(3) + 8, VA(9) + 4096), 0x3000000000000001UL);
    EXPECT_NO_FAULT();
    enter_mode(PRV_U, UCODE(u_load), VA(2), VA(9) + 4096);
    EXPECT_FAULT(C_LOAD_PAGE, VA(2));
    CHECK_EQ(enter_mode(PRV_U, UCODE(u_store), VA(3) + 24, VA(9) + 4096), 1);
    EXPECT_NO_FAULT();
    enter_mode(PRV_U, UCODE(u_store), VA(13) + 24, VA(9) + 4096);
    EXPECT_FAULT(C_STORE_PAGE, VA(13) + 24);
    m_resume = UCODE(u_exit);
    enter_mode(PRV_U, UCODE(u_jump), VA(2), VA(9) + 4096);
    EXPECT_FAULT(C_FETCH_PAGE, VA(2));
    m_resume = UCODE(u_exit);
    enter_mode(PRV_U, UCODE(u_jump), SALIAS(s_ret_stub), VA(9) + 4096);   /* not a U page */
    EXPECT_FAULT(C_FETCH_PAGE, SALIAS(s_ret_stub));
    m_resume = 0;

    /* MPRV: M-mode loads and stores translated as MPP's mode. */
    u64 mprv = MS_MPRV;
    csrc(mstatus, MS_MPP);
    csrs(mstatus, (u64)PRV_S << 11);
    asm volatile(".option push\n.option norvc\ncsrs mstatus, %1\nld %0, 8(%2)\ncsrc mstatus, %1\n.option pop"
                 : "=&r"(v) : "r"(mprv), "r"(VA(7)) : "memory");
    CHECK_EQ(v, 0x5000000000000001UL);
    csrc(mstatus, MS_MPP);                                  /* MPP = U */
    asm volatile(".option push\n.option norvc\ncsrs mstatus, %1\nld %0, 32(%2)\ncsrc mstatus, %1\n.option pop"
                 : "=&r"(v) : "r"(mprv), "r"(VA(3)) : "memory");
    CHECK_EQ(v, 0x3000000000000004UL);
    EXPECT_NO_FAULT();
    asm volatile(".option push\n.option norvc\ncsrs mstatus, %1\nld %0, 16(%2)\ncsrc mstatus, %1\n.option pop"
                 : "=&r"(v) : "r"(mprv), "r"(VA(2)) : "memory");
    EXPECT_FAULT(C_LOAD_PAGE, VA(2) + 16);
    /* A page-table walk that reads from where there is no memory: access fault (QEMU 7.2
       reports a page fault). */
    csrw(satp, ((u64)SATP_MODE << 60) | (HOLE >> 12));
    csrs(mstatus, (u64)PRV_S << 11);
    asm volatile(".option push\n.option norvc\ncsrs mstatus, %1\nld %0, 0(%2)\ncsrc mstatus, %1\n.option pop"
                 : "=&r"(v) : "r"(mprv), "r"(VA(7)) : "memory");
    CHECK(m_rec.cause == C_LOAD_ACCESS || (on_qemu() && m_rec.cause == C_LOAD_PAGE));
    CHECK_EQ(m_rec.tval, VA(7));
    trap_reset();
    csrw(satp, satp_value());
    asm volatile("sfence.vma" ::: "memory");
}

int main(void) {
    setup_machine();
    build_tables();
    csrw(satp, satp_value());
    CHECK_EQ(csrr(satp), satp_value());
    asm volatile("sfence.vma" ::: "memory");
    enter_mode(PRV_S, (u64)s_main, 0, (u64)lower_stack_top);
    csrw(medeleg, (1UL << C_FETCH_PAGE) | (1UL << C_LOAD_PAGE) | (1UL << C_STORE_PAGE));
    enter_mode(PRV_S, (u64)s_delegated, 0, (u64)lower_stack_top);
    csrw(medeleg, 0);
    machine_side();
    csrw(satp, 0);
    return failures;
}
