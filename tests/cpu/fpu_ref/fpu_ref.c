/*
 * Reference for pyvirt's soft-float: runs single RISC-V F/D instructions on
 * operands read from stdin and writes the results and the accrued fflags.
 * Built with riscv64-linux-gnu-gcc -static -O2 and run under qemu-riscv64.
 *
 *   fpu_ref list      prints the operation names, one per line (index = order)
 *   fpu_ref           reads records of five little-endian u64
 *                     (op index, rounding mode 0..4, a, b, c) and writes two
 *                     u64 per record (result register value, fflags)
 *
 * Floating-point operands travel as raw 64-bit register values (moved with
 * fmv.d.x, so improperly NaN-boxed singles reach the instruction unchanged);
 * floating-point results come back as the whole 64-bit f register (fmv.x.d),
 * integer results as the x register.  The rounding mode is set in frm and the
 * instructions use the dynamic mode.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef void (*op_fn)(const uint64_t *in, uint64_t *out);

#define PRE "fsrm %[rm]\n\tcsrw fflags, zero\n\t"
#define POST "frflags %[fl]\n\t"

/* fp result from three fp operands */
#define R3(name, insn)                                                        \
    static void name(const uint64_t *in, uint64_t *out) {                     \
        uint64_t r, fl;                                                       \
        __asm__ volatile("fmv.d.x ft0, %[a]\n\tfmv.d.x ft1, %[b]\n\t"         \
                         "fmv.d.x ft2, %[c]\n\t" PRE                          \
                         insn " ft3, ft0, ft1, ft2\n\t" POST                  \
                         "fmv.x.d %[r], ft3"                                  \
                         : [r] "=&r"(r), [fl] "=&r"(fl)                       \
                         : [a] "r"(in[2]), [b] "r"(in[3]), [c] "r"(in[4]),    \
                           [rm] "r"(in[1])                                    \
                         : "ft0", "ft1", "ft2", "ft3", "memory");             \
        out[0] = r;                                                           \
        out[1] = fl;                                                          \
    }

/* fp result from two fp operands */
#define R2(name, insn)                                                        \
    static void name(const uint64_t *in, uint64_t *out) {                     \
        uint64_t r, fl;                                                       \
        __asm__ volatile("fmv.d.x ft0, %[a]\n\tfmv.d.x ft1, %[b]\n\t" PRE     \
                         insn " ft3, ft0, ft1\n\t" POST "fmv.x.d %[r], ft3"   \
                         : [r] "=&r"(r), [fl] "=&r"(fl)                       \
                         : [a] "r"(in[2]), [b] "r"(in[3]), [rm] "r"(in[1])    \
                         : "ft0", "ft1", "ft3", "memory");                    \
        out[0] = r;                                                           \
        out[1] = fl;                                                          \
    }

/* fp result from one fp operand */
#define R1(name, insn)                                                        \
    static void name(const uint64_t *in, uint64_t *out) {                     \
        uint64_t r, fl;                                                       \
        __asm__ volatile("fmv.d.x ft0, %[a]\n\t" PRE                          \
                         insn " ft3, ft0\n\t" POST "fmv.x.d %[r], ft3"        \
                         : [r] "=&r"(r), [fl] "=&r"(fl)                       \
                         : [a] "r"(in[2]), [rm] "r"(in[1])                    \
                         : "ft0", "ft3", "memory");                           \
        out[0] = r;                                                           \
        out[1] = fl;                                                          \
    }

/* integer result from two fp operands */
#define I2(name, insn)                                                        \
    static void name(const uint64_t *in, uint64_t *out) {                     \
        uint64_t r, fl;                                                       \
        __asm__ volatile("fmv.d.x ft0, %[a]\n\tfmv.d.x ft1, %[b]\n\t" PRE     \
                         insn " %[r], ft0, ft1\n\t" POST                      \
                         : [r] "=&r"(r), [fl] "=&r"(fl)                       \
                         : [a] "r"(in[2]), [b] "r"(in[3]), [rm] "r"(in[1])    \
                         : "ft0", "ft1", "memory");                           \
        out[0] = r;                                                           \
        out[1] = fl;                                                          \
    }

/* integer result from one fp operand */
#define I1(name, insn)                                                        \
    static void name(const uint64_t *in, uint64_t *out) {                     \
        uint64_t r, fl;                                                       \
        __asm__ volatile("fmv.d.x ft0, %[a]\n\t" PRE                          \
                         insn " %[r], ft0\n\t" POST                           \
                         : [r] "=&r"(r), [fl] "=&r"(fl)                       \
                         : [a] "r"(in[2]), [rm] "r"(in[1])                    \
                         : "ft0", "memory");                                  \
        out[0] = r;                                                           \
        out[1] = fl;                                                          \
    }

/* fp result from one integer operand */
#define FI(name, insn)                                                        \
    static void name(const uint64_t *in, uint64_t *out) {                     \
        uint64_t r, fl;                                                       \
        __asm__ volatile(PRE insn " ft3, %[a]\n\t" POST "fmv.x.d %[r], ft3"   \
                         : [r] "=&r"(r), [fl] "=&r"(fl)                       \
                         : [a] "r"(in[2]), [rm] "r"(in[1])                    \
                         : "ft3", "memory");                                  \
        out[0] = r;                                                           \
        out[1] = fl;                                                          \
    }

#define FORMAT_OPS(X, sfx)                                                    \
    R2(fadd_##X, "fadd." sfx) R2(fsub_##X, "fsub." sfx)                       \
    R2(fmul_##X, "fmul." sfx) R2(fdiv_##X, "fdiv." sfx)                       \
    R1(fsqrt_##X, "fsqrt." sfx)                                               \
    R3(fmadd_##X, "fmadd." sfx) R3(fmsub_##X, "fmsub." sfx)                   \
    R3(fnmsub_##X, "fnmsub." sfx) R3(fnmadd_##X, "fnmadd." sfx)               \
    R2(fmin_##X, "fmin." sfx) R2(fmax_##X, "fmax." sfx)                       \
    R2(fsgnj_##X, "fsgnj." sfx) R2(fsgnjn_##X, "fsgnjn." sfx)                 \
    R2(fsgnjx_##X, "fsgnjx." sfx)                                             \
    I2(feq_##X, "feq." sfx) I2(flt_##X, "flt." sfx) I2(fle_##X, "fle." sfx)   \
    I1(fclass_##X, "fclass." sfx)                                             \
    I1(fcvt_w_##X, "fcvt.w." sfx) I1(fcvt_wu_##X, "fcvt.wu." sfx)             \
    I1(fcvt_l_##X, "fcvt.l." sfx) I1(fcvt_lu_##X, "fcvt.lu." sfx)             \
    FI(fcvt_##X##_w, "fcvt." sfx ".w") FI(fcvt_##X##_wu, "fcvt." sfx ".wu")   \
    FI(fcvt_##X##_l, "fcvt." sfx ".l") FI(fcvt_##X##_lu, "fcvt." sfx ".lu")

FORMAT_OPS(s, "s")
FORMAT_OPS(d, "d")
R1(fcvt_s_d, "fcvt.s.d")
R1(fcvt_d_s, "fcvt.d.s")

#define ENTRIES(X)                                                            \
    {"fadd_" #X, fadd_##X}, {"fsub_" #X, fsub_##X}, {"fmul_" #X, fmul_##X},   \
    {"fdiv_" #X, fdiv_##X}, {"fsqrt_" #X, fsqrt_##X},                         \
    {"fmadd_" #X, fmadd_##X}, {"fmsub_" #X, fmsub_##X},                       \
    {"fnmsub_" #X, fnmsub_##X}, {"fnmadd_" #X, fnmadd_##X},                   \
    {"fmin_" #X, fmin_##X}, {"fmax_" #X, fmax_##X},                           \
    {"fsgnj_" #X, fsgnj_##X}, {"fsgnjn_" #X, fsgnjn_##X},                     \
    {"fsgnjx_" #X, fsgnjx_##X},                                               \
    {"feq_" #X, feq_##X}, {"flt_" #X, flt_##X}, {"fle_" #X, fle_##X},         \
    {"fclass_" #X, fclass_##X},                                               \
    {"fcvt_w_" #X, fcvt_w_##X}, {"fcvt_wu_" #X, fcvt_wu_##X},                 \
    {"fcvt_l_" #X, fcvt_l_##X}, {"fcvt_lu_" #X, fcvt_lu_##X},                 \
    {"fcvt_" #X "_w", fcvt_##X##_w}, {"fcvt_" #X "_wu", fcvt_##X##_wu},       \
    {"fcvt_" #X "_l", fcvt_##X##_l}, {"fcvt_" #X "_lu", fcvt_##X##_lu}

static const struct {
    const char *name;
    op_fn fn;
} ops[] = {
    ENTRIES(s),
    ENTRIES(d),
    {"fcvt_s_d", fcvt_s_d},
    {"fcvt_d_s", fcvt_d_s},
};

#define NOPS (sizeof ops / sizeof ops[0])
#define BATCH 4096

int main(int argc, char **argv) {
    static uint64_t in[BATCH][5], out[BATCH][2];
    size_t n, i;

    if (argc > 1 && strcmp(argv[1], "list") == 0) {
        for (i = 0; i < NOPS; i++)
            printf("%s\n", ops[i].name);
        return 0;
    }
    while ((n = fread(in, sizeof in[0], BATCH, stdin)) > 0) {
        for (i = 0; i < n; i++) {
            if (in[i][0] >= NOPS || in[i][1] > 4) {
                fprintf(stderr, "bad record %zu\n", i);
                return 2;
            }
            ops[in[i][0]].fn(in[i], out[i]);
        }
        if (fwrite(out, sizeof out[0], n, stdout) != n)
            return 1;
    }
    return 0;
}
