/* System-call heavy: N rounds of getuid, a 64-byte write into a pipe and the read
 * back out of it (three system calls a round), timed inside the guest with
 * CLOCK_MONOTONIC.  Prints the rounds, a checksum and the elapsed nanoseconds. */
#include "rt.h"

struct timespec_ { long sec, nsec; };

static long sys1(long n, long a) { return sys3(n, a, 0, 0); }
static long now_ns(void) {
    struct timespec_ t;
    sys3(113, 1, (long)&t, 0);                      /* clock_gettime(CLOCK_MONOTONIC) */
    return t.sec * 1000000000L + t.nsec;
}

void _start_c(long *sp) {
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    u64 rounds = 20000;
    if (argc > 1) {
        rounds = 0;
        for (const char *p = argv[1]; *p >= '0' && *p <= '9'; p++) rounds = rounds * 10 + (u64)(*p - '0');
    }
    int fds[2];
    if (sys3(59, (long)fds, 0, 0) != 0) { put("pipe2 failed\n"); leave(1); }   /* pipe2 */
    char out[64], in[64];
    u64 sum = 0;
    long t0 = now_ns();
    for (u64 i = 0; i < rounds; i++) {
        sum += (u64)sys1(174, 0) + 1;               /* getuid */
        for (int k = 0; k < 64; k++) out[k] = (char)(i + k);
        if (sys3(64, fds[1], (long)out, 64) != 64) { put("write failed\n"); leave(1); }
        if (sys3(63, fds[0], (long)in, 64) != 64) { put("read failed\n"); leave(1); }
        for (int k = 0; k < 64; k += 8) sum += (unsigned char)in[k];
    }
    long t1 = now_ns();
    put("syscalls "); put_u64(rounds); put(" "); put_u64(sum); put(" ns "); put_u64((u64)(t1 - t0)); put("\n");
    leave(0);
}

__asm__(".globl _start\n_start:\n mv a0, sp\n call _start_c\n");
