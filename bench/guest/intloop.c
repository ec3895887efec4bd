/* Integer loop: arithmetic, shifts and a branch per iteration. */
#include "rt.h"
#ifndef REPS
#define REPS 1
#endif
void _start(void) {
    u64 x = 1, acc = 0;
    for (u64 i = 0; i < 3000000UL * REPS; i++) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        acc += (x >> 33) ^ i;
    }
    put("intloop "); put_u64(acc); put("\n");
    leave(0);
}
