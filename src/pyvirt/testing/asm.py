"""Assemble, link and cross-run RISC-V test programs at test time.

The CPU tests write their guest programs as assembly (or a little C) inside
the test files; this module turns them into ELF files with the
riscv64-linux-gnu toolchain and runs them under QEMU for comparison:

* `user_elf(source)` links a complete freestanding Linux user program
  (``-nostdlib -static -march=rv64gc``, no linker relaxation, so `gp` is an
  ordinary register).  `user_program(body)` wraps a snippet in a harness that
  dumps every register and a scratch buffer to stdout (see `DUMP_*`).
* `bare_elf(asm=..., c=...)` links an M-mode program at 0x8000_0000 with an
  HTIF ``tohost``/``fromhost`` pair in its own page (`BARE_RUNTIME` gives
  `_start`, a stack, `htif_exit()` and `htif_putchar()`).
* `run_qemu_user(elf)` runs a user program under qemu-riscv64;
  `run_qemu_spike(elf)` runs a bare-metal one on qemu-system-riscv64's spike
  machine, whose HTIF reports the exit code.

Built ELFs are cached by a hash of everything that went into them, in one
temporary directory per process (`set_cache_dir()` points it elsewhere, e.g.
at pytest's session temp dir): a test parametrised over engines builds its
program once.  Missing tools are reported by `toolchain_missing()` /
`qemu_system_missing()` as one line, for `pytest.skip`.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import random
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pyvirt.errors import BuildError
from pyvirt.machine.elf import parse_elf

CROSS = "riscv64-linux-gnu-"
ARCH_FLAGS = ["-march=rv64gc", "-mabi=lp64d"]
USER_FLAGS = ["-nostdlib", "-static", "-no-pie", "-fno-pie", *ARCH_FLAGS, "-Wl,--no-relax", "-Wl,--build-id=none",
              "-Wl,--no-warn-rwx-segments"]
BARE_FLAGS = ["-nostdlib", "-static", "-no-pie", "-fno-pie", "-ffreestanding", "-fno-stack-protector",
              "-fno-builtin", "-mcmodel=medany", "-O1", *ARCH_FLAGS, "-Wl,--no-relax",
              "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments"]

_cache_dir: Path | None = None
_built: dict[str, Path] = {}


# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------
def toolchain_missing() -> str | None:
    """Why user-program tests cannot run here (a missing tool), or None."""
    for tool in (f"{CROSS}gcc", f"{CROSS}as", f"{CROSS}ld", "qemu-riscv64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: gcc-riscv64-linux-gnu, qemu-user)"
    return None


@lru_cache(maxsize=1)
def qemu_system_missing() -> str | None:
    """Why bare-metal programs cannot be cross-checked on QEMU's spike machine, or None."""
    if shutil.which("qemu-system-riscv64") is None:
        return "qemu-system-riscv64 is not installed (Debian: qemu-system-misc)"
    try:
        p = subprocess.run(["qemu-system-riscv64", "-M", "help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"qemu-system-riscv64 does not run: {e}"
    if not any(line.split()[:1] == ["spike"] for line in p.stdout.splitlines()):
        return "qemu-system-riscv64 has no spike machine"
    return None


def set_cache_dir(path: str | Path) -> None:
    """Build into `path` from now on (it must exist)."""
    global _cache_dir
    _cache_dir = Path(path)


def cache_dir() -> Path:
    """Where builds go: `set_cache_dir()`'s, or a temporary directory removed at exit."""
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = Path(tempfile.mkdtemp(prefix="pyvirt-asm-"))
        atexit.register(shutil.rmtree, _cache_dir, True)
    return _cache_dir


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _errors(text: str) -> str:
    """The tool's error lines, joined into one line."""
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "collect2" not in line and "in function" not in line]
    return " | ".join(lines[:6]) or "no output"


def _build(kind: str, files: dict[str, str], flags: list[str], extra: dict[str, str] | None = None) -> Path:
    """Compile and link `files` (name -> text; .S, .c or .ld) into a cached ELF; `extra`
    files (headers) are written beside them but not passed to the compiler."""
    extra = extra or {}
    h = hashlib.sha256(kind.encode())
    for name in sorted(files):
        h.update(f"\0{name}\0{files[name]}".encode())
    for name in sorted(extra):
        h.update(f"\0h:{name}\0{extra[name]}".encode())
    h.update("\0".join(flags).encode())
    digest = h.hexdigest()[:20]
    exe = _built.get(digest)
    if exe is not None and exe.exists():
        return exe
    work = cache_dir() / f"{kind}-{digest}"
    exe = work / "prog.elf"
    if not exe.exists():
        if any("/" in name or name.startswith(".") for name in [*files, *extra]):
            raise ValueError("source names must be plain file names")
        work.mkdir(parents=True, exist_ok=True)
        for name, text in extra.items():
            (work / name).write_text(text)
        inputs = []
        for name, text in files.items():
            (work / name).write_text(text)
            if name.endswith(".ld"):
                inputs += ["-T", name]
            else:
                inputs.append(name)
        cmd = [f"{CROSS}gcc", *flags, "-o", "prog.tmp", *inputs]
        try:
            p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise BuildError(f"{CROSS}gcc is not installed") from None
        if p.returncode != 0:
            raise BuildError(f"assembling a test program failed ({work}): {_errors(p.stderr)}")
        os.replace(work / "prog.tmp", exe)
    _built[digest] = exe
    return exe


def user_elf(source: str) -> Path:
    """Link a complete assembly source (defining `_start`) as a static user program."""
    return _build("user", {"prog.S": source}, USER_FLAGS)


def static_c(source: str) -> Path:
    """Compile a C program (with main) as a static riscv64 Linux user program (glibc)."""
    return _build("cstatic", {"prog.c": source}, ["-static", "-Os"])


def symbols(elf: str | Path) -> dict[str, int]:
    """The ELF's symbol table: name -> value."""
    return parse_elf(Path(elf).read_bytes(), str(elf)).symbols


# ---------------------------------------------------------------------------
# Running under QEMU
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QemuUserResult:
    returncode: int          # exit status, or -signal when the guest died of a signal
    stdout: bytes
    stderr: bytes

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None


@lru_cache(maxsize=512)
def run_qemu_user(elf: Path, timeout: float = 60) -> QemuUserResult:
    """Run a user program under qemu-riscv64 (results cached per ELF: it is deterministic)."""
    p = subprocess.run(["qemu-riscv64", str(elf)], capture_output=True, timeout=timeout,
                       cwd=cache_dir(), preexec_fn=_no_core_dumps)
    return QemuUserResult(p.returncode, p.stdout, p.stderr)


@dataclass(frozen=True)
class QemuSpikeResult:
    exit_code: int | None    # None: it did not finish in time
    console: bytes


@lru_cache(maxsize=256)
def run_qemu_spike(elf: Path, timeout: float = 20) -> QemuSpikeResult:
    """Run a bare-metal program on qemu-system-riscv64 -M spike; HTIF gives the exit code."""
    cmd = ["qemu-system-riscv64", "-M", "spike", "-smp", "1", "-m", "64M", "-bios", "none",
           "-kernel", str(elf), "-display", "none", "-serial", "stdio", "-monitor", "none"]
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=cache_dir(),
                           stdin=subprocess.DEVNULL, preexec_fn=_no_core_dumps)
    except subprocess.TimeoutExpired as e:
        return QemuSpikeResult(None, e.stdout or b"")
    return QemuSpikeResult(p.returncode, p.stdout)


# ---------------------------------------------------------------------------
# User programs that dump their state
# ---------------------------------------------------------------------------
# Dump record layout (little-endian 64-bit words), written to stdout by
# `__dump` after the body: x0..x31 (x0 slot = a record marker), f0..f31,
# fcsr, then the scratch buffer.
DUMP_REGS = 0
DUMP_FREGS = 256
DUMP_FCSR = 512
DUMP_HEAD = 520
DUMP_MARKER = 0x44554D50        # "DUMP"

# Interesting register values for the initial state.
EDGE_VALUES = [0, 1, 2, -1, -2, 0x7FFFFFFF, -0x80000000, 0x80000000, 0xFFFFFFFF, 0x7FFFFFFFFFFFFFFF,
               -0x8000000000000000, 31, 32, 63, 64, 0x1234_5678_9ABC_DEF0, -0x1234_5678]

_DUMP_ROUTINE = """
    .option push
    .option norvc
    .text
    .balign 4
    .globl __dump
# Write x1..x31, f0..f31, fcsr and the scratch buffer to stdout; every
# register but ra (the caller's link) keeps its value.  gp is the dump base.
__dump:
    sd x1, 8(gp)
    sd x2, 16(gp)
    sd x3, 24(gp)
{stores}
    frcsr t6
    sd t6, {fcsr}(gp)
    li t6, {marker}
    sd t6, 0(gp)
    li a0, 1
    mv a1, gp
    li a2, {head}
    li a7, 64
    ecall
    li a0, 1
    la a1, __buf
    li a2, {bufsize}
    li a7, 64
    ecall
{loads}
    ld t6, {t6off}(gp)
    ret
__exit:
    li a0, 0
    li a7, 93
    ecall
    .option pop
"""


def _dump_routine(bufsize: int) -> str:
    stores = [f"    sd x{r}, {8 * r}(gp)" for r in range(4, 32)]
    stores += [f"    fsd f{r}, {DUMP_FREGS + 8 * r}(gp)" for r in range(32)]
    loads = [f"    ld x{r}, {8 * r}(gp)" for r in range(4, 31)]
    return _DUMP_ROUTINE.format(stores="\n".join(stores), loads="\n".join(loads), fcsr=DUMP_FCSR,
                                marker=DUMP_MARKER, head=DUMP_HEAD, bufsize=bufsize, t6off=8 * 31)


def init_lines(seed: int, fregs: bool = True) -> str:
    """Assembly giving x1, x4..x31 (and f0..f31) deterministic, sign-rich values from `seed`."""
    rng = random.Random(seed)
    out = []
    for r in [1] + list(range(4, 32)):
        v = rng.choice(EDGE_VALUES) if rng.random() < 0.4 else rng.getrandbits(64) - (1 << 63)
        out.append(f"    li x{r}, {v}")
    if fregs:
        for r in range(32):
            out.append(f"    li t0, {rng.getrandbits(64):#x}")
            out.append(f"    fmv.d.x f{r}, t0")
        out.append("    csrwi fcsr, 0")
        out.append(f"    li t0, {rng.getrandbits(64) - (1 << 63)}")
    return "\n".join(out)


def buffer_words(seed: int, size: int) -> str:
    rng = random.Random(seed ^ 0x5EED)
    words = [rng.choice(EDGE_VALUES) & (2 ** 64 - 1) if rng.random() < 0.2 else rng.getrandbits(64)
             for _ in range(size // 8)]
    return "\n".join(f"    .dword {', '.join(hex(w) for w in words[i:i + 8])}" for i in range(0, len(words), 8))


def user_program_source(body: str, seed: int = 1, bufsize: int = 8192, data: str = "",
                        fregs: bool = True) -> str:
    """The assembly of a dumping user program (see `user_program`)."""
    if bufsize % 4096:
        raise ValueError("bufsize must be a multiple of 4096")
    return f"""
    .text
    .globl _start
    .balign 4
_start:
    .option push
    .option norvc
    la gp, __dumparea
    la sp, __stack_top
{init_lines(seed, fregs)}
    .option pop
# ---- body ----
{body}
# ---- end of body ----
    .option push
    .option norvc
    jal ra, __dump
    j __exit
    .option pop
{_dump_routine(bufsize)}
    .data
    .balign 4096
    .globl __buf
__buf:
{buffer_words(seed, bufsize)}
    .balign 4096
    .globl __dumparea
__dumparea:
    .space {DUMP_HEAD}
    .balign 16
    .space 4096
__stack_top:
    .space 64
{data}
"""


def user_program(body: str, seed: int = 1, bufsize: int = 8192, data: str = "",
                 fregs: bool = True) -> Path:
    """A user program that sets every register from `seed`, runs `body`, then dumps.

    Conventions for `body`: gp holds the dump area (do not change it); sp
    points to a 4 KiB stack of its own; ``__buf`` is a page-aligned scratch
    buffer of `bufsize` bytes filled with seeded data; ``jal ra, __dump``
    writes a dump record (registers, FP registers, fcsr, buffer) at any point
    and returns with every register but ra unchanged.  After the body one
    last record is written and the program exits 0.  `data` is appended to
    the .data section.
    """
    return user_elf(user_program_source(body, seed, bufsize, data, fregs))


def split_dumps(stdout: bytes, bufsize: int = 8192) -> list[bytes]:
    """Cut a program's stdout into its dump records."""
    size = DUMP_HEAD + bufsize
    return [stdout[i:i + size] for i in range(0, len(stdout), size)]


def describe_difference(got: bytes, want: bytes, bufsize: int = 8192) -> str:
    """One line naming the first dump word where `got` (pyvirt) and `want` (QEMU) differ."""
    size = DUMP_HEAD + bufsize
    if len(got) != len(want):
        return f"output length {len(got)} != {len(want)} ({len(got) / size:.2f} vs {len(want) / size:.2f} dumps)"
    for i in range(0, len(want), 8):
        g, w = got[i:i + 8], want[i:i + 8]
        if g != w:
            rec, off = divmod(i, size)
            if off < DUMP_FREGS:
                what = f"x{off // 8}"
            elif off < DUMP_FCSR:
                what = f"f{(off - DUMP_FREGS) // 8}"
            elif off < DUMP_HEAD:
                what = "fcsr"
            else:
                what = f"__buf+{off - DUMP_HEAD:#x}"
            return (f"dump {rec}, {what}: pyvirt {int.from_bytes(g, 'little'):#018x} "
                    f"qemu {int.from_bytes(w, 'little'):#018x}")
    return "identical"


# ---------------------------------------------------------------------------
# Bare-metal (M-mode) programs
# ---------------------------------------------------------------------------
BARE_LINKER_SCRIPT = """
OUTPUT_ARCH(riscv)
ENTRY(_start)
SECTIONS
{
  . = 0x80000000;
  .text : { KEEP(*(.text.start)) *(.text .text.*) }
  . = ALIGN(16);
  .rodata : { *(.rodata .rodata.* .srodata .srodata.*) }
  . = ALIGN(4096);
  .data : { *(.data .data.* .sdata .sdata.*) }
  .bss : { *(.bss .bss.* .sbss .sbss.* COMMON) }
  . = ALIGN(4096);
  .tohost : { *(.tohost) }
  . = ALIGN(4096);
  .stack (NOLOAD) : { . += 16384; _stack_top = .; }
  _end = .;
  /DISCARD/ : { *(.note .note.* .comment .eh_frame .riscv.attributes) }
}
"""

BARE_RUNTIME = """
    .section .text.start, "ax"
    .globl _start
_start:
    .option push
    .option norvc
    la sp, _stack_top
    csrw mtvec, zero
    call main
    .option pop
    .globl htif_exit
# htif_exit(code): report `code` through tohost and stop.
htif_exit:
    slli a0, a0, 1
    ori a0, a0, 1
    la t0, tohost
1:  sd a0, 0(t0)
    j 1b
    .globl htif_putchar
# htif_putchar(c): console device 1, command 1.
htif_putchar:
    la t0, tohost
    li t1, 0x0101000000000000
    andi a0, a0, 0xff
    or a0, a0, t1
1:  ld t1, 0(t0)
    bnez t1, 1b
    sd a0, 0(t0)
2:  ld t1, 0(t0)
    bnez t1, 2b
    la t0, fromhost
    sd zero, 0(t0)
    ret

    .section .tohost, "aw", @progbits
    .balign 64
    .globl tohost
    .type tohost, @object
    .size tohost, 8
tohost: .dword 0
    .balign 64
    .globl fromhost
    .type fromhost, @object
    .size fromhost, 8
fromhost: .dword 0
"""


def bare_elf(asm: str | Sequence[str] = (), c: str | Sequence[str] = (),
             headers: Mapping[str, str] | None = None,
             defines: Mapping[str, int | str] | None = None) -> Path:
    """Link an M-mode program at 0x8000_0000 from assembly and C sources plus `BARE_RUNTIME`.

    `_start` sets up a stack and calls `main()`; when main returns, its value
    is the exit code.  Sources may call `htif_exit(code)` and
    `htif_putchar(c)`.  `headers` are written next to the sources (for
    ``#include "name.h"``); `defines` become ``-DNAME=value`` (.S files go
    through the preprocessor too).
    """
    files = {"runtime.S": BARE_RUNTIME, "link.ld": BARE_LINKER_SCRIPT}
    for i, text in enumerate([asm] if isinstance(asm, str) else asm):
        files[f"prog{i}.S"] = text
    for i, text in enumerate([c] if isinstance(c, str) else c):
        files[f"prog{i}.c"] = text
    extra = {name: text for name, text in (headers or {}).items()}
    flags = BARE_FLAGS + [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    return _build("bare", files, flags, extra)
