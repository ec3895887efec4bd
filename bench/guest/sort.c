/* Memory-heavy: fill 64 Ki 64-bit words from an LCG, heap-sort them, checksum. */
#include "rt.h"
#define N (64 * 1024)
#ifndef REPS
#define REPS 1
#endif
static u64 a[N];
static void sift(u64 *v, i64 root, i64 end) {
    while (2 * root + 1 <= end) {
        i64 child = 2 * root + 1, sw = root;
        if (v[sw] < v[child]) sw = child;
        if (child + 1 <= end && v[sw] < v[child + 1]) sw = child + 1;
        if (sw == root) return;
        u64 t = v[root]; v[root] = v[sw]; v[sw] = t; root = sw;
    }
}
void _start(void) {
    u64 x = 42, sum = 0;
    for (int r = 0; r < REPS; r++) {
        for (i64 i = 0; i < N; i++) { x = x * 6364136223846793005UL + 1; a[i] = x >> 11; }
        for (i64 s = (N - 2) / 2; s >= 0; s--) sift(a, s, N - 1);
        for (i64 e = N - 1; e > 0; e--) { u64 t = a[e]; a[e] = a[0]; a[0] = t; sift(a, 0, e - 1); }
        for (i64 i = 1; i < N; i++) { if (a[i - 1] > a[i]) { put("unsorted\n"); leave(1); } sum += a[i] * i; }
    }
    put("sort "); put_u64(sum); put("\n");
    leave(0);
}
