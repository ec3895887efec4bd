/* Block I/O inside the guest: sequential write and read (1 MiB requests) and random
 * 4 KiB writes and reads (LCG offsets) on /dev/vda with O_DIRECT, each timed with
 * CLOCK_MONOTONIC.  Prints one line per workload: name, bytes, nanoseconds, checksum. */
#include "rt.h"

struct timespec_ { long sec, nsec; };
static long now_ns(void) {
    struct timespec_ t;
    sys3(113, 1, (long)&t, 0);
    return t.sec * 1000000000L + t.nsec;
}
static long sys4(long n, long a, long b, long c, long d) {
    register long a0 __asm__("a0") = a, a1 __asm__("a1") = b, a2 __asm__("a2") = c, a3 __asm__("a3") = d;
    register long a7 __asm__("a7") = n;
    __asm__ volatile("ecall" : "+r"(a0) : "r"(a1), "r"(a2), "r"(a3), "r"(a7) : "memory");
    return a0;
}
#define O_RDWR 2
#define O_DIRECT 040000
#define MIB (1024 * 1024)
static unsigned char buf[MIB] __attribute__((aligned(4096)));

static void report(const char *name, u64 bytes, long ns, u64 sum) {
    put(name); put(" "); put_u64(bytes); put(" "); put_u64((u64)ns); put(" "); put_u64(sum); put("\n");
}

static u64 parse(const char *p) { u64 v = 0; while (*p >= '0' && *p <= '9') v = v * 10 + (u64)(*p++ - '0'); return v; }

void _start_c(long *sp) {
    char **argv = (char **)(sp + 1);
    u64 mib = sp[0] > 1 ? parse(argv[1]) : 32, ops = sp[0] > 2 ? parse(argv[2]) : 2000;
    long fd = sys4(56, -100, (long)"/dev/vda", O_RDWR | O_DIRECT, 0);    /* openat */
    if (fd < 0) { put("cannot open /dev/vda\n"); leave(1); }
    for (u64 i = 0; i < MIB; i++) buf[i] = (unsigned char)(i * 7 + 3);
    long t = now_ns();
    for (u64 i = 0; i < mib; i++)
        if (sys4(68, fd, (long)buf, MIB, (long)(i * MIB)) != MIB) { put("write failed\n"); leave(1); }  /* pwrite64 */
    sys3(82, fd, 0, 0);                                                  /* fsync */
    report("seqwrite", mib * MIB, now_ns() - t, 0);
    u64 sum = 0;
    t = now_ns();
    for (u64 i = 0; i < mib; i++) {
        if (sys4(67, fd, (long)buf, MIB, (long)(i * MIB)) != MIB) { put("read failed\n"); leave(1); }   /* pread64 */
        sum += buf[i & (MIB - 1)];
    }
    report("seqread", mib * MIB, now_ns() - t, sum);
    u64 blocks = mib * MIB / 4096, x = 12345;
    t = now_ns();
    for (u64 i = 0; i < ops; i++) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        buf[0] = (unsigned char)i;
        if (sys4(68, fd, (long)buf, 4096, (long)((x >> 33) % blocks * 4096)) != 4096) { put("write failed\n"); leave(1); }
    }
    sys3(82, fd, 0, 0);
    report("randwrite", ops * 4096, now_ns() - t, 0);
    sum = 0;
    t = now_ns();
    for (u64 i = 0; i < ops; i++) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        if (sys4(67, fd, (long)buf, 4096, (long)((x >> 33) % blocks * 4096)) != 4096) { put("read failed\n"); leave(1); }
        sum += buf[0];
    }
    report("randread", ops * 4096, now_ns() - t, sum);
    leave(0);
}

__asm__(".globl _start\n_start:\n mv a0, sp\n call _start_c\n");
