/* Memory-heavy, random access: open-addressing hash table of 128 Ki slots. */
#include "rt.h"
#define SLOTS (1 << 17)
#ifndef REPS
#define REPS 1
#endif
static u64 keys[SLOTS], vals[SLOTS];
void _start(void) {
    u64 x = 7, hits = 0;
    for (u64 i = 0; i < 200000UL * REPS; i++) {
        x = x * 2862933555777941757UL + 3037000493UL;
        u64 k = (x >> 20) % 100000 + 1, h = (k * 11400714819323198485UL) >> 47;
        while (keys[h] && keys[h] != k) h = (h + 1) & (SLOTS - 1);
        if (keys[h] == k) { hits++; vals[h] += i; } else { keys[h] = k; vals[h] = i; }
    }
    u64 sum = 0;
    for (u64 i = 0; i < SLOTS; i++) sum += keys[i] * 31 + vals[i];
    put("hashtab "); put_u64(hits); put(" "); put_u64(sum); put("\n");
    leave(0);
}
