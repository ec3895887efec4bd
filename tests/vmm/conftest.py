"""Fixtures shared by the VMM tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirt.testing import asm

PROGRAM = r"""
#include <stdint.h>
extern volatile uint64_t tohost;
volatile uint64_t result[4];
static uint64_t table[512];
int main(void) {
    uint64_t h = 1469598103934665603ull;
    asm volatile("li t0, 0x2000; csrs mstatus, t0" ::: "t0");     /* FS on: FP allowed */
    double acc = 0.5;
    for (int round = 0; round < 40; round++) {
        for (int i = 0; i < 512; i++) {
            table[i] = table[(i * 7 + round) & 511] * 31 + i + h;
            h = (h ^ table[i]) * 1099511628211ull;
            acc = acc * 1.0000001 + (double)(h & 0xFF) / 256.0;
        }
    }
    result[0] = h;
    result[1] = *(uint64_t *)&acc;
    result[2] = table[17];
    result[3] = 0x600D;
    tohost = 1;                       /* exit status 0; then wait, so the end is exact */
    for (;;)
        asm volatile("wfi");
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = asm.toolchain_missing()
    if why:
        pytest.skip(why)
    asm.set_cache_dir(tmp_path_factory.mktemp("asm"))
    return asm.bare_elf(c=PROGRAM)
