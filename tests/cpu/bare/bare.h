/* Shared definitions for pyvirt's bare-metal CPU test programs (M-mode, linked at 0x80000000).
 *
 * The runtime (rt.S) provides trap entries for M and S that save every register in a frame
 * and call m_trap_c()/s_trap_c() below, enter_mode() to run a function in S or U mode, and
 * lower_exit() to come back from it.  Each program checks itself with CHECK(); main()
 * returns the number of failed checks (0 = pass), each failure printed through HTIF.
 */
#include <stdint.h>

typedef uint64_t u64;
typedef uint32_t u32;

#define EXIT_MAGIC 0x5EC0DE
#define SVC_CLEAR_STIP 0x51     /* ecall service from S: clear mip.STIP */
#define SVC_SET_STIP 0x52

#define csrr(r) ({ u64 _v; asm volatile("csrr %0, " #r : "=r"(_v) :: "memory"); _v; })
#define csrw(r, v) asm volatile("csrw " #r ", %0" :: "r"((u64)(v)) : "memory")
#define csrs(r, v) asm volatile("csrs " #r ", %0" :: "r"((u64)(v)) : "memory")
#define csrc(r, v) asm volatile("csrc " #r ", %0" :: "r"((u64)(v)) : "memory")

/* mstatus */
#define MS_SIE (1UL << 1)
#define MS_MIE (1UL << 3)
#define MS_SPIE (1UL << 5)
#define MS_MPIE (1UL << 7)
#define MS_SPP (1UL << 8)
#define MS_MPP (3UL << 11)
#define MS_FS (3UL << 13)
#define MS_MPRV (1UL << 17)
#define MS_SUM (1UL << 18)
#define MS_MXR (1UL << 19)
#define MS_TVM (1UL << 20)
#define MS_TW (1UL << 21)
#define MS_TSR (1UL << 22)
#define MS_SD (1UL << 63)
/* interrupts */
#define IRQ_SSI 1
#define IRQ_STI 5
#define IRQ_SEI 9
#define INTERRUPT (1UL << 63)
/* causes */
#define C_FETCH_ACCESS 1
#define C_ILLEGAL 2
#define C_BREAKPOINT 3
#define C_LOAD_MISALIGNED 4
#define C_LOAD_ACCESS 5
#define C_STORE_MISALIGNED 6
#define C_STORE_ACCESS 7
#define C_ECALL_U 8
#define C_ECALL_S 9
#define C_ECALL_M 11
#define C_FETCH_PAGE 12
#define C_LOAD_PAGE 13
#define C_STORE_PAGE 15
#define NO_TRAP 99

#define PRV_U 0
#define PRV_S 1
#define PRV_M 3

/* Last trap taken to M and to S (filled by the handlers). */
struct trap_record { volatile u64 count, cause, epc, tval, status, a7; };
extern struct trap_record m_rec, s_rec;
/* Where the next synchronous exception resumes (0: the next 4-byte instruction). */
extern volatile u64 m_resume, s_resume;
/* Interrupts taken, by cause, in M and S. */
extern volatile u64 m_irqs[16], s_irqs[16];
extern volatile u64 irq_log[16], irq_log_n;
extern u64 last_frame[32];

void m_trap_entry(void);
void s_trap_entry(void);
void m_vector_table(void);
void s_vector_table(void);
extern volatile u64 s_vec_hits[16], m_vec_hits[16];
u64 enter_mode(u64 mode, u64 fn, u64 arg, u64 stack);
void lower_exit(u64 value) __attribute__((noreturn));
void htif_putchar(int c);
void htif_exit(u64 code) __attribute__((noreturn));

/* Reporting */
void puts_(const char *s);
void put_hex(u64 v);
void put_dec(u64 v);
extern int failures;
void check_failed(int line, const char *what, u64 a, u64 b);
#define CHECK(cond) do { if (!(cond)) check_failed(__LINE__, #cond, 0, 0); } while (0)
#define CHECK_EQ(a, b) do { u64 _a = (u64)(a), _b = (u64)(b); \
    if (_a != _b) check_failed(__LINE__, #a " == " #b, _a, _b); } while (0)

/* QEMU's marchid is non-zero, pyvirt's is 0: for the few places where the two may differ
   as the specification allows. */
int on_qemu(void);

/* Clear the trap records before an access that may fault. */
void trap_reset(void);
void setup_machine(void);

/* Memory accesses with known, 4-byte encodings (the M handler skips 4 bytes). */
static inline u64 ld64(u64 a) { u64 v; asm volatile(".option push\n.option norvc\nld %0, 0(%1)\n.option pop" : "=r"(v) : "r"(a) : "memory"); return v; }
static inline u32 lw32(u64 a) { u64 v; asm volatile(".option push\n.option norvc\nlwu %0, 0(%1)\n.option pop" : "=r"(v) : "r"(a) : "memory"); return (u32)v; }
static inline void sd64(u64 a, u64 v) { asm volatile(".option push\n.option norvc\nsd %0, 0(%1)\n.option pop" :: "r"(v), "r"(a) : "memory"); }
static inline u64 amoadd64(u64 a, u64 v) { u64 o; asm volatile(".option push\n.option norvc\namoadd.d %0, %1, (%2)\n.option pop" : "=r"(o) : "r"(v), "r"(a) : "memory"); return o; }
/* Call the code at `a` (its `ret` comes back), resuming after the call if it faults. */
void call_at(u64 a);
