"""The built default image boots under QEMU (the reference machine) and /init keeps its contract.

QEMU's virt board has the same syscon "test finisher" at 0x100000 as pyvirt's,
and QEMU exits with status N when the guest writes (N << 16) | 0x3333 there
(0 for 0x5555), so the exit status /init reports is QEMU's own.
"""

from __future__ import annotations

import base64
import os
import pty
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pyvirt.images import DefaultImage, default_image
from pyvirt.images.cpio import CpioWriter

pytestmark = pytest.mark.slow
QEMU = shutil.which("qemu-system-riscv64")
OPENSBI_LAST_LINE = "Boot HART MEDELEG"


@pytest.fixture(scope="module")
def image() -> DefaultImage:
    if QEMU is None:
        pytest.skip("qemu-system-riscv64 is not installed")
    return default_image(build=True, progress=False)


def _qemu_args(kernel: Path, initrd: Path, append: str, *extra: str) -> list[str]:
    assert QEMU is not None
    return [QEMU, "-M", "virt", "-m", "256M", "-nographic", "-no-reboot", *extra, "-kernel", str(kernel),
            "-initrd", str(initrd), "-append", append]


def run_command(image: DefaultImage, command: str, quiet: bool = True) -> tuple[int, str]:
    """Boot with pyvirt.cmd=<command>; return QEMU's exit status and what the guest printed after OpenSBI."""
    append = "console=ttyS0 " + ("quiet loglevel=0 " if quiet else "")
    append += "pyvirt.cmd=" + base64.b64encode(command.encode()).decode()
    p = subprocess.run(_qemu_args(image.kernel, image.initrd, append), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=300)
    out = p.stdout.decode(errors="replace")
    return p.returncode, out.split(OPENSBI_LAST_LINE, 1)[-1].split("\n", 1)[-1]


def test_command_output_and_success(image: DefaultImage) -> None:
    code, out = run_command(image, "uname -m; echo $((6*7))")
    assert code == 0
    assert out == "riscv64\n42\n"               # the command's own output, byte for byte, nothing else


def test_exit_status_reaches_qemu(image: DefaultImage) -> None:
    code, out = run_command(image, "echo to-stdout; echo to-stderr >&2; cat; exit 3")
    assert code == 3
    assert "to-stdout\n" in out and "to-stderr\n" in out         # stdin is /dev/null: cat returns
    assert run_command(image, "exit 255")[0] == 255
    assert run_command(image, "kill -9 $$")[0] == 137


def test_command_environment(image: DefaultImage) -> None:
    code, out = run_command(image, 'echo "$PWD $HOME $(hostname)"; mount | cut -d" " -f3,5 | sort | '
                                   'tr "\\n" " "; echo; ls -l /dev/null /dev/mem | cut -c1')
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "/ /root pyvirt"
    for mount in ("/proc proc", "/sys sysfs", "/dev devtmpfs", "/dev/pts devpts", "/tmp tmpfs"):
        assert mount in lines[1], mount
    assert lines[2:] == ["c", "c"]


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:          # the other side closed
                chunk = b""
            if not chunk:
                raise AssertionError(f"console closed before {needle!r}; got {buf[-500:]!r}")
            buf += chunk
    return buf


def test_interactive_shell_prompt_and_poweroff(image: DefaultImage) -> None:
    primary, secondary = pty.openpty()
    p = subprocess.Popen(_qemu_args(image.kernel, image.initrd, image.cmdline), stdin=secondary,
                         stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    try:
        _read_until(primary, b"root@pyvirt:/# ", 120)
        os.write(primary, b"echo $((6*7)) $(tty) $PS1\r")
        out = _read_until(primary, b"root@pyvirt:/# ", 30)
        assert b"42 /dev/ttyS0 root@\\h:\\w#" in out          # (\h: the host name, pyvirt here)
        os.write(primary, b"sleep 30 &\r")                  # job control works
        _read_until(primary, b"root@pyvirt:/# ", 30)
        os.write(primary, b"jobs\r")
        _read_until(primary, b"Running", 30)
        os.write(primary, b"exit\r")
        assert p.wait(timeout=60) == 0                        # the shell's end powers the machine off
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(primary)


def _tiny_init(tmp_path: Path) -> Path | None:
    """An initramfs whose /init prints rdtime and powers off at once (needs the cross binutils)."""
    asm = """
        .globl _start
    _start:
        rdtime  t0
        mv      a1, sp
        li      t2, 10
        addi    a1, a1, -1
        li      t3, 10
        sb      t3, 0(a1)
    1:  remu    t1, t0, t2
        divu    t0, t0, t2
        addi    t1, t1, 48
        addi    a1, a1, -1
        sb      t1, 0(a1)
        bnez    t0, 1b
        sub     a2, sp, a1
        li      a0, 1
        li      a7, 64
        ecall
        li      a0, 0xfee1dead
        li      a1, 672274793
        li      a2, 0x4321fedc
        li      a7, 142
        ecall
    2:  j       2b
    """
    if not (shutil.which("riscv64-linux-gnu-as") and shutil.which("riscv64-linux-gnu-ld")):
        return None
    (tmp_path / "init.S").write_text(asm)
    subprocess.run(["riscv64-linux-gnu-as", "-o", str(tmp_path / "init.o"), str(tmp_path / "init.S")],
                   check=True)
    subprocess.run(["riscv64-linux-gnu-ld", "-static", "-o", str(tmp_path / "init"), str(tmp_path / "init.o")],
                   check=True)
    w = CpioWriter()
    w.char_device("dev/console", 5, 1)
    w.file("init", (tmp_path / "init").read_bytes(), 0o755)
    out = tmp_path / "tiny.cpio"
    out.write_bytes(w.to_bytes())
    return out


def test_kernel_reaches_init_quickly(image: DefaultImage, tmp_path: Path) -> None:
    """Lean enough: with -icount shift=0 (1 ns of guest time per instruction), rdtime at /init's
    first instruction counts the instructions of the whole boot (OpenSBI included)."""
    tiny = _tiny_init(tmp_path)
    if tiny is None:
        pytest.skip("riscv64-linux-gnu binutils are not installed")
    p = subprocess.run(_qemu_args(image.kernel, tiny, "console=ttyS0 quiet", "-icount", "shift=0"),
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    ticks = [int(line) for line in p.stdout.decode(errors="replace").split() if line.isdigit()]
    assert ticks, p.stdout[-2000:]
    instructions = ticks[-1] * 100                      # 10 MHz timebase: 100 ns per tick
    print(f"\ninstructions to /init: {instructions / 1e6:.1f} M")
    assert instructions < 120_000_000


def test_long_command_fits_the_kernel_command_line(image: DefaultImage) -> None:
    """riscv's COMMAND_LINE_SIZE is 1024: a ~600-byte command (800 in base64) still gets through."""
    payload = "0123456789" * 59
    code, out = run_command(image, f"echo {payload} | wc -c")
    assert code == 0 and out.strip() == str(len(payload) + 1)
