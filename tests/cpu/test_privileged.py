"""Privileged architecture on bare metal: traps, delegation, Sv39/Sv48 paging, A/D bits, SUM,
sfence.vma, satp WARL, access faults, supervisor software interrupts.  The program checks itself
and reports the number of the first failed check through HTIF tohost (0 = all passed); it also
runs under qemu-system-riscv64's spike machine as a cross-check of the expectations.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pyvirt.testing.baremetal import run_bare
from pyvirt.testing.guestprog import bare_program

PROGRAM = r"""
#define MODE __MODE__
typedef uint64_t u64;
static u64 pt[6][512] __attribute__((aligned(4096)));
static volatile uint8_t pages[4][4096] __attribute__((aligned(4096)));
volatile u64 last_cause, last_tval, resume_to, s_irqs;

#define csrr(r) ({ u64 v; asm volatile("csrr %0, " #r : "=r"(v)); v; })
#define csrw(r, v) asm volatile("csrw " #r ", %0" :: "r"((u64)(v)) : "memory")
#define csrs(r, v) asm volatile("csrs " #r ", %0" :: "r"((u64)(v)) : "memory")
#define csrc(r, v) asm volatile("csrc " #r ", %0" :: "r"((u64)(v)) : "memory")

#define V 1
#define R 2
#define W 4
#define X 8
#define U 16
#define A 64
#define D 128
#define PTE(pa, f) ((((u64)(pa)) >> 12) << 10 | (f))
#define TEST_VA 0x40000000UL

/* M-mode trap handler: record, then skip the faulting instruction (or resume elsewhere). */
asm(".align 4\n.globl m_trap\nm_trap:\n"
    "csrw mscratch, t0\n"
    "csrr t0, mcause\n la t1, last_cause\n sd t0, 0(t1)\n"
    "csrr t0, mtval\n la t1, last_tval\n sd t0, 0(t1)\n"
    "la t1, resume_to\n ld t0, 0(t1)\n bnez t0, 1f\n"
    "csrr t0, mepc\n addi t0, t0, 4\n"
    "1: csrw mepc, t0\n sd zero, 0(t1)\n"
    "csrr t0, mscratch\n mret\n");
/* S-mode handler for the software interrupt. */
asm(".align 4\n.globl s_trap\ns_trap:\n"
    "csrw sscratch, t0\n la t0, s_irqs\n ld t1, 0(t0)\n addi t1, t1, 1\n sd t1, 0(t0)\n"
    "li t0, 2\n csrc sip, t0\n csrr t0, sscratch\n sret\n");
void m_trap(void); void s_trap(void);

static u64 load(u64 va) { u64 v; asm volatile(".option push\n.option norvc\nld %0, 0(%1)\n.option pop" : "=r"(v) : "r"(va) : "memory"); return v; }
static void store(u64 va, u64 v) { asm volatile(".option push\n.option norvc\nsd %0, 0(%1)\n.option pop" :: "r"(v), "r"(va) : "memory"); }
static void fault_reset(void) { last_cause = 99; last_tval = 0; }

static volatile int fail;
static volatile uint64_t tohost_code;
extern volatile u64 tohost;
static void report(int code) { tohost = ((u64)code << 1) | 1; for (;;) {} }
#define CHECK(n, cond) do { if (!(cond)) report(n); } while (0)

static void s_main(void) {
    u64 *leaf = pt[MODE == 9 ? 3 : 2];
    /* 1-2: A then D set by hardware. */
    CHECK(1, load(TEST_VA) == 0x1111);
    CHECK(2, (leaf[0] & (A | D)) == A);
    store(TEST_VA + 8, 5);
    CHECK(3, (leaf[0] & (A | D)) == (A | D));
    /* 4: store to a read-only page: store page fault with stval. */
    fault_reset(); store(TEST_VA + 0x1000, 1);
    CHECK(4, last_cause == 15 && last_tval == TEST_VA + 0x1000);
    /* 5: fetch from a non-executable page. */
    fault_reset();
    asm volatile("la t0, 1f\n la t1, resume_to\n sd t0, 0(t1)\n jalr zero, 0(%0)\n 1:" :: "r"(TEST_VA + 0x2000) : "t0", "t1", "memory");
    CHECK(5, last_cause == 12 && last_tval == TEST_VA + 0x2000);
    /* 6: unmapped: load page fault. */
    fault_reset(); load(TEST_VA + 0x5000);
    CHECK(6, last_cause == 13 && last_tval == TEST_VA + 0x5000);
    /* 7-8: U page from S: fault without SUM, fine with it. */
    fault_reset(); load(TEST_VA + 0x3000);
    CHECK(7, last_cause == 13);
    csrs(sstatus, 1 << 18);
    CHECK(8, load(TEST_VA + 0x3000) == 0x4444);
    csrc(sstatus, 1 << 18);
    /* 9: remap and sfence.vma. */
    leaf[0] = PTE(pages[3], V | R | W | A | D);
    asm volatile("sfence.vma %0" :: "r"(TEST_VA) : "memory");
    CHECK(9, load(TEST_VA) == 0x4444);
    /* 10: an reserved satp mode is ignored (WARL). */
    u64 satp = csrr(satp);
    csrw(satp, (3UL << 60) | 5);     /* mode 3 is reserved */
    CHECK(10, csrr(satp) == satp);
    /* 11-12: supervisor software interrupt: pending but masked, then taken when SIE is set. */
    csrw(stvec, (u64)s_trap);
    csrs(sie, 2);
    csrs(sip, 2);
    CHECK(11, s_irqs == 0);
    csrs(sstatus, 2);
    asm volatile("nop");
    CHECK(12, s_irqs == 1);
    csrc(sstatus, 2);
    report(0);
}

int main(void) {
    csrw(mtvec, (u64)m_trap);
    /* Open all of memory to S-mode through PMP, as firmware does (QEMU enforces PMP). */
    csrw(pmpaddr0, -1UL);
    csrw(pmpcfg0, 0x1f);
    /* 20: access fault on a physical address with nothing behind it. */
    fault_reset(); load(0x200000000UL);
    CHECK(20, last_cause == 5 && last_tval == 0x200000000UL);
    /* 21: illegal instruction tval. */
    fault_reset(); asm volatile(".option push\n.option norvc\n.word 0\n.option pop");
    CHECK(21, last_cause == 2);
    pages[0][0] = 0x11; pages[0][1] = 0x11;
    pages[3][0] = 0x44; pages[3][1] = 0x44;
    u64 *root = pt[0];
    u64 *l1 = pt[1], *l0;
    if (MODE == 9) {
        /* Sv48: root -> l2 (pt[1]) -> l1 (pt[2]) -> l0 (pt[3]); 512 GiB index 0. */
        root[0] = PTE(pt[1], V);
        pt[1][2] = PTE(0x80000000UL, V | R | W | X | A | D);           /* 1 GiB identity */
        pt[1][1] = PTE(pt[2], V);
        pt[2][0] = PTE(pt[3], V);
        l0 = pt[3];
    } else {
        root[2] = PTE(0x80000000UL, V | R | W | X | A | D);            /* 1 GiB identity */
        root[1] = PTE(pt[1], V);
        l1[0] = PTE(pt[2], V);
        l0 = pt[2];
    }
    l0[0] = PTE(pages[0], V | R | W);            /* A/D clear */
    l0[1] = PTE(pages[1], V | R | A);            /* read-only */
    l0[2] = PTE(pages[2], V | R | W | A | D);    /* not executable */
    l0[3] = PTE(pages[3], V | R | U | A);        /* user page */
    csrw(mideleg, 2);
    csrw(satp, ((u64)MODE << 60) | ((u64)root >> 12));
    asm volatile("sfence.vma" ::: "memory");
    /* Drop to S-mode at s_main. */
    u64 st = csrr(mstatus);
    st = (st & ~(3UL << 11)) | (1UL << 11);
    csrw(mstatus, st);
    csrw(mepc, (u64)s_main);
    asm volatile("la sp, _stack_top\n mret");
    return 1;
}
"""


@pytest.fixture(params=[8, 9], ids=["sv39", "sv48"])
def program(request: pytest.FixtureRequest):
    return bare_program(PROGRAM.replace("__MODE__", str(request.param)))


def test_privileged_checks(program, engine: tuple[str, int]) -> None:
    r = run_bare(program, engine=engine[0], hot=engine[1])
    assert r.exit_code == 0, f"check {r.exit_code} failed"


@pytest.mark.skipif(shutil.which("qemu-system-riscv64") is None, reason="qemu-system-riscv64 not installed")
def test_expectations_hold_on_qemu(program) -> None:
    p = subprocess.run(["qemu-system-riscv64", "-M", "spike", "-bios", "none", "-kernel", str(program),
                        "-nographic", "-display", "none"], capture_output=True, timeout=60)
    assert p.returncode == 0, f"qemu exit {p.returncode}: check {p.returncode >> 1 if p.returncode else 0}"
