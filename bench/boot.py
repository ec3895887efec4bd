"""Boot the default guest to its shell prompt with pyvirt and with QEMU, in one run.

    .venv/bin/python bench/boot.py [--runs N] [--cpus N] [--engine jit|interp]

Both get the same kernel, initramfs, memory size and hart count; each is
started on a pseudo-terminal and timed from process start until the shell
prompt appears on the console.  QEMU (qemu-system-riscv64, TCG) runs with its
default OpenSBI firmware; pyvirt serves the SBI itself.
"""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import signal
import statistics
import sys
import time

from pyvirt.cpu.riscv.engine import default_engine
from pyvirt.images import default_image

PROMPT = re.compile(rb"root@pyvirt:[^\r\n]*# ")


def time_to_prompt(argv: list[str], timeout: float = 600) -> float:
    start = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    buf = b""
    try:
        while not PROMPT.search(buf):
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"no prompt from {argv[0]} after {timeout} s: {buf[-300:]!r}")
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    buf += os.read(fd, 65536)
                except OSError:
                    raise RuntimeError(f"{argv[0]} exited before the prompt: {buf[-300:]!r}") from None
        return time.perf_counter() - start
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--engine", default=default_engine(), choices=("jit", "interp", "native"))
    args = ap.parse_args()
    img = default_image(build=True, progress=False)
    ours = [sys.executable, "-m", "pyvirt", "run", "--engine", args.engine, "--cpus", str(args.cpus),
            "--memory", args.memory, "--kernel", str(img.kernel), "--initrd", str(img.initrd),
            "--append", img.cmdline]
    qemu = ["qemu-system-riscv64", "-M", "virt", "-smp", str(args.cpus), "-m", args.memory, "-nographic",
            "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", img.cmdline]
    p_times, q_times = [], []
    for _ in range(args.runs):
        p_times.append(time_to_prompt(ours))
        q_times.append(time_to_prompt(qemu))
    p, q = statistics.median(p_times), statistics.median(q_times)
    print(f"boot to shell prompt, {args.cpus} hart(s), {args.memory}, engine {args.engine}, "
          f"median of {args.runs} (Python {sys.version.split()[0]})")
    print("| VMM | min s | median s | max s |")
    print("|---|---:|---:|---:|")
    print(f"| pyvirt | {min(p_times):.2f} | {p:.2f} | {max(p_times):.2f} |")
    print(f"| qemu-system-riscv64 (TCG) | {min(q_times):.2f} | {q:.2f} | {max(q_times):.2f} |")
    print(f"\npyvirt / QEMU: {p / q:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
