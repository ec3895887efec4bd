"""Build small RISC-V test programs at test time (riscv64-linux-gnu toolchain).

`user_program(body)` wraps assembly in a freestanding Linux user program:
registers x5..x31 (except x5 = `buf`) start from known values, the body
runs, then every integer and FP register, fcsr and a 512-byte scratch buffer
(`buf`, page-aligned, 8 KiB) are written to stdout and the program exits 0.
The same ELF runs under qemu-riscv64 and on pyvirt, and the dumps compare
byte for byte.  `bare_program(c_source)` links a C program at 0x8000_0000
for M-mode with a `tohost` symbol.  Builds are cached by content.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

CROSS = "riscv64-linux-gnu-"
_DIR = Path(tempfile.gettempdir()) / "pyvirt-guestprog"

_USER_HEAD = """
    .option norvc
    .globl _start
    .text
_start:
    la gp, dump
    la x5, buf
{init}
    .option rvc
"""

_USER_TAIL = """
    .option norvc
dump_and_exit:
{stores}
    frcsr t6
    sd t6, 512(gp)
    li a0, 1
    mv a1, gp
    li a2, 1032
    li a7, 64
    ecall
    li a0, 0
    li a7, 93
    ecall
    .data
    .align 12
dump: .space 520
    .space 8
    .align 12
buf: .space 8192
"""


def toolchain_missing() -> str | None:
    for tool in (f"{CROSS}gcc", "qemu-riscv64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _build(source: str, suffix: str, flags: list[str]) -> Path:
    _DIR.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    exe = _DIR / f"{digest}.elf"
    if exe.exists():
        return exe
    src = _DIR / f"{digest}{suffix}"
    src.write_text(source)
    tmp = _DIR / f"{digest}.tmp"
    p = subprocess.run([f"{CROSS}gcc", *flags, "-o", str(tmp), str(src)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"building test program failed:\n{p.stderr}\n{source}")
    tmp.replace(exe)
    return exe


def register_init(seed: int) -> str:
    """`li` lines giving x6..x31 (not gp) distinct, sign-rich values from `seed`."""
    import random
    rng = random.Random(seed)
    picks = [0, 1, -1, 0x7FFFFFFF, -0x80000000, 0x7FFFFFFFFFFFFFFF, -0x8000000000000000, 0xFFFFFFFF, 31, 63, 64]
    lines = []
    for r in range(6, 32):
        v = rng.choice(picks) if rng.random() < 0.4 else rng.getrandbits(64) - (1 << 63)
        lines.append(f"    li x{r}, {v}")
    return "\n".join(lines)


def user_program(body: str, seed: int = 1) -> Path:
    # sp (x2) differs between environments (the initial stack), so it is not dumped.
    stores = "\n".join(f"    sd x{r}, {8 * r}(gp)" for r in range(1, 32) if r not in (2, 3))
    stores += "\n" + "\n".join(f"    fsd f{r}, {256 + 8 * r}(gp)" for r in range(32))
    source = _USER_HEAD.format(init=register_init(seed)) + body + "\n    j dump_and_exit\n" + \
        _USER_TAIL.format(stores=stores)
    return _build(source, ".S", ["-nostdlib", "-static", "-march=rv64gc", "-mabi=lp64d",
                                 "-Wl,--no-relax"])


_LINK = """
OUTPUT_ARCH(riscv)
ENTRY(_start)
SECTIONS {
  . = 0x80000000;
  .text : { *(.text.start) *(.text*) }
  .rodata : { *(.rodata*) }
  .data : { *(.data*) *(.sdata*) }
  .bss : { *(.bss*) *(.sbss*) *(COMMON) }
  . = ALIGN(4096);
  .tohost : { *(.tohost) }
  /DISCARD/ : { *(.note*) *(.comment) }
}
"""

_BARE_START = """
    .section .text.start
    .globl _start
_start:
    la sp, _stack_top
    call main
    slli a0, a0, 1
    ori a0, a0, 1
    la t0, tohost
    sd a0, 0(t0)
1:  j 1b
    .section .tohost, "aw"
    .align 6
    .globl tohost
tohost: .dword 0
    .size tohost, 8
    .type tohost, @object
    .globl fromhost
fromhost: .dword 0
    .size fromhost, 8
    .type fromhost, @object
    .bss
    .align 12
    .space 16384
    .globl _stack_top
_stack_top:
"""


def bare_program(c_source: str) -> Path:
    """An M-mode program: `int main(void)` returns the exit code reported through tohost."""
    _DIR.mkdir(parents=True, exist_ok=True)
    ld = _DIR / "bare.ld"
    ld.write_text(_LINK)
    start = _DIR / "bare_start.S"
    start.write_text(_BARE_START)
    src = f'#include <stdint.h>\n{c_source}'
    digest = hashlib.sha256((src + _LINK + _BARE_START).encode()).hexdigest()[:16]
    exe = _DIR / f"bare-{digest}.elf"
    if exe.exists():
        return exe
    cfile = _DIR / f"bare-{digest}.c"
    cfile.write_text(src)
    tmp = _DIR / f"bare-{digest}.tmp"
    p = subprocess.run([f"{CROSS}gcc", "-O1", "-nostdlib", "-static", "-ffreestanding", "-fno-stack-protector",
                        "-mcmodel=medany", "-fno-pie", "-no-pie", "-march=rv64gc", "-mabi=lp64d", "-T", str(ld), "-o", str(tmp),
                        str(start), str(cfile)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"building bare-metal program failed:\n{p.stderr}")
    tmp.replace(exe)
    return exe


def run_qemu_user(exe: Path) -> tuple[int, bytes]:
    p = subprocess.run(["qemu-riscv64", str(exe)], capture_output=True, timeout=60)
    return p.returncode, p.stdout
