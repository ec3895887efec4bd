/* A fault in the middle of a hot (translated) block: the block writes many registers, then
 * faults -- an access fault in M (load from a hole), a store page fault in S under Sv39 --
 * and the M handler's copy of the registers (last_frame) and m_rec must be exactly what the
 * interpreter gives.  The test compares them across engines; the program checks them too. */
#include "bare.h"

#define HOLE 0x10000000UL
#define ROUNDS 30
extern char work_fault[], work_ret[], lower_stack_top[];

/* work(a0 = address, a1 = round): a block of register writes around one load and one store. */
asm(".option push\n.option norvc\n.globl work\nwork:\n"
    " addi t1, a1, 1\n slli t2, a1, 7\n xor t3, t1, t2\n addi a2, a1, -5\n mul a3, a1, a1\n"
    " addi a4, a1, 100\n sub a5, x0, a1\n addi a6, a1, 7\n sll a7, t1, a1\n or t4, a2, a3\n"
    " addiw t5, a1, -1\n srai t6, a5, 1\n"
    ".globl work_fault\nwork_fault: ld t0, 8(a0)\n"
    " add a2, a2, t0\n sd a3, 16(a0)\n addi t1, t1, 1000\n add a3, a3, t0\n"
    ".globl work_ret\nwork_ret: ret\n"
    ".option pop\n");

static u64 data[8] __attribute__((aligned(4096)));
u64 first_frame[32], first_rec[6];         /* the M fault's state (last_frame is overwritten) */
static u64 pt[3][512] __attribute__((aligned(4096)));
static u64 ro_page[512] __attribute__((aligned(4096)));

static void call_work(u64 addr, u64 round) {
    asm volatile("mv a0, %0\nmv a1, %1\ncall work" :: "r"(addr), "r"(round)
                 : "ra", "t0", "t1", "t2", "t3", "t4", "t5", "t6", "a0", "a1", "a2", "a3", "a4", "a5",
                   "a6", "a7", "memory");
}

static void check_frame(u64 round) {
    u64 *f = last_frame;
    CHECK_EQ(f[11], round);
    CHECK_EQ(f[6], round + 1);
    CHECK_EQ(f[7], round << 7);
    CHECK_EQ(f[28], (round + 1) ^ (round << 7));
    CHECK_EQ(f[12], round - 5);                 /* a2: not yet updated from the load */
    CHECK_EQ(f[13], round * round);
    CHECK_EQ(f[17], (round + 1) << round);
    CHECK_EQ(f[31], (u64)((int64_t)(-(int64_t)round) >> 1));
}

static void s_loop(void) {
    for (u64 i = 0; i < ROUNDS; i++) call_work(0x40001000UL, i);
    m_resume = (u64)work_ret;
    call_work(0x40000000UL, ROUNDS);           /* the load works, the store hits a read-only page */
    lower_exit(0);
}

int main(void) {
    setup_machine();
    /* M: an access fault at the load. */
    for (u64 i = 0; i < ROUNDS; i++) call_work((u64)data, i);
    trap_reset();
    m_resume = (u64)work_ret;
    call_work(HOLE, ROUNDS);
    CHECK_EQ(m_rec.cause, C_LOAD_ACCESS);
    CHECK_EQ(m_rec.epc, (u64)work_fault);
    CHECK_EQ(m_rec.tval, HOLE + 8);
    check_frame(ROUNDS);
    for (int i = 0; i < 32; i++) first_frame[i] = last_frame[i];
    first_rec[0] = m_rec.count; first_rec[1] = m_rec.cause; first_rec[2] = m_rec.epc;
    first_rec[3] = m_rec.tval; first_rec[4] = m_rec.status; first_rec[5] = m_rec.a7;
    /* S under Sv39: a store page fault after the load. */
    pt[0][2] = (0x80000000UL >> 12) << 10 | 0xCF;                  /* 1 GiB identity, VRWXAD */
    pt[0][1] = ((u64)pt[1] >> 12) << 10 | 1;
    pt[1][0] = ((u64)pt[2] >> 12) << 10 | 1;
    pt[2][0] = ((u64)ro_page >> 12) << 10 | 0x43;                  /* VA 0x40000000: R only */
    pt[2][1] = ((u64)data >> 12) << 10 | 0xC7;                     /* VA 0x40001000: RW */
    ro_page[1] = 5;
    csrw(satp, (8UL << 60) | ((u64)pt[0] >> 12));
    asm volatile("sfence.vma");
    trap_reset();
    enter_mode(PRV_S, (u64)s_loop, 0, (u64)lower_stack_top);
    CHECK_EQ(m_rec.cause, C_STORE_PAGE);
    CHECK_EQ(m_rec.tval, 0x40000000UL + 16);
    CHECK_EQ(m_rec.epc, (u64)work_fault + 8);
    CHECK_EQ(last_frame[5], 5);                                    /* t0: loaded */
    CHECK_EQ(last_frame[12], ROUNDS - 5 + 5);                      /* a2 updated by the load */
    CHECK_EQ(last_frame[13], ROUNDS * ROUNDS);
    CHECK_EQ(last_frame[11], ROUNDS);
    csrw(satp, 0);
    return failures;
}
