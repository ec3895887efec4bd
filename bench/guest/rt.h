/* Freestanding runtime for pyvirt's benchmark programs: raw Linux syscalls. */
#pragma once
typedef unsigned long u64;
typedef long i64;
static inline long sys3(long n, long a, long b, long c) {
    register long a0 __asm__("a0") = a, a1 __asm__("a1") = b, a2 __asm__("a2") = c;
    register long a7 __asm__("a7") = n;
    __asm__ volatile("ecall" : "+r"(a0) : "r"(a1), "r"(a2), "r"(a7) : "memory");
    return a0;
}
static void put(const char *s) { long n = 0; while (s[n]) n++; sys3(64, 1, (long)s, n); }
static void put_u64(u64 v) {
    char b[24]; int i = 23; b[i] = 0;
    do { b[--i] = '0' + v % 10; v /= 10; } while (v);
    put(b + i);
}
__attribute__((noreturn)) static void leave(int code) { sys3(93, code, 0, 0); for (;;) {} }
