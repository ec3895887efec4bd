/* A writer for the dirty-page log test (tests/cpu/test_dirty_log.py): stores to pseudo-random
 * pages of a 2 MiB buffer forever, in turns in M-mode (no paging) and in S-mode under Sv39
 * (the buffer mapped through 4 KiB pages at another virtual address, the rest 1:1 through a
 * global 1 GiB page), with byte, half, word, double, AMO, SC and FP stores.  The host stops it
 * between slices, compares RAM with its last copy and checks every changed page was logged. */
#include "bare.h"

/* PTE flags: a table pointer (V), a global RWX page and a data page (both accessed, dirty). */
#define PPN(pa) ((((u64)(pa)) >> 12) << 10)
#define P_TABLE 0x01UL
#define P_GLOBAL_RWX 0xEFUL
#define P_DATA 0xC7UL
#define NPAGES 512
#define BUF_VA 0x40000000UL

static u64 pt[3][512] __attribute__((aligned(4096)));
static volatile unsigned char buf[NPAGES][4096] __attribute__((aligned(4096)));
extern char lower_stack_top[];
static u64 seed = 12345;

static u64 next(void) { seed = seed * 6364136223846793005UL + 1442695040888963407UL; return seed >> 33; }

static void writes(volatile unsigned char *base, u64 rounds) {
    for (u64 n = 0; n < rounds; n++) {
        u64 r = next();
        volatile unsigned char *p = base + (r % NPAGES) * 4096 + ((r >> 9) % 4000);
        switch ((r >> 20) % 7) {
        case 0: *p = (unsigned char)n; break;
        case 1: *(volatile uint16_t *)((u64)p & ~1UL) = (uint16_t)n; break;
        case 2: *(volatile u32 *)((u64)p & ~3UL) = (u32)n; break;
        case 3: *(volatile u64 *)((u64)p & ~7UL) = n; break;
        case 4: asm volatile("amoadd.d zero, %1, (%0)" :: "r"((u64)p & ~7UL), "r"(n) : "memory"); break;
        case 5: {
            u64 a = (u64)p & ~7UL, old, fail;
            asm volatile("lr.d %0, (%2)\n sc.d %1, %3, (%2)" : "=&r"(old), "=&r"(fail) : "r"(a), "r"(n) : "memory");
            break;
        }
        default: {
            double d = (double)n;
            asm volatile("fsd %1, 0(%0)" :: "r"((u64)p & ~7UL), "f"(d) : "memory");
        }
        }
    }
}

static void s_writer(u64 rounds) { writes((volatile unsigned char *)BUF_VA, rounds); lower_exit(0); }

int main(void) {
    setup_machine();
    pt[0][2] = PPN(0x80000000UL) | P_GLOBAL_RWX;
    pt[0][1] = PPN(pt[1]) | P_TABLE;
    pt[1][0] = PPN(pt[2]) | P_TABLE;
    for (int i = 0; i < NPAGES; i++) pt[2][i] = PPN(buf[i]) | P_DATA;
    csrw(satp, (8UL << 60) | (1UL << 44) | ((u64)pt[0] >> 12));
    asm volatile("sfence.vma" ::: "memory");
    for (;;) {
        writes(buf[0], 3000);
        enter_mode(PRV_S, (u64)s_writer, 3000, (u64)lower_stack_top);
    }
}
