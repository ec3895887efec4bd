"""Boot the default guest to its shell prompt with pyvirt and with QEMU, in one run.

    .venv/bin/python bench/boot.py [--runs N] [--cpus N] [--engine E] [--kernel default|debian]
                                   [--idle SECONDS] [--code-cache warm|off]

Both get the same kernel, initramfs, memory size and hart count; each is
started on a pseudo-terminal and timed from process start until the shell
prompt appears on the console.  QEMU (qemu-system-riscv64, TCG) runs with its
default OpenSBI firmware; pyvirt serves the SBI itself.  After the prompt each VMM
gets SIGTERM (both quit cleanly on it; SIGKILL only if one has not after 30 s), so
that pyvirt keeps its native code cache.  With `--code-cache warm` (the default)
pyvirt boots once more first, not counted, so that every counted boot finds the
cache filled as a user's second boot does; `off` runs without the cache (every
block translated, as before the cache existed).
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

from pyvirt.engines import ENGINES, default_engine
from pyvirt.images import default_image

PROMPT = re.compile(rb"root@pyvirt:[^\r\n]*# ")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its waited-for children (proc(5) fields 14-17)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


CPU_TO_PROMPT: list[float] = []


def time_to_prompt(argv: list[str], timeout: float = 600, idle: float = 0.0,
                   settle: float = 5.0) -> tuple[float, float | None]:
    """Seconds from start to the shell prompt (and, in CPU_TO_PROMPT, the CPU seconds the
    process had used by then: on a shared machine the figure load does not inflate);
    with `idle`, then the share of one
    core the process uses while the guest sits at its prompt for that long
    (after `settle` seconds: a kernel finishes deferred work after the prompt)."""
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
        elapsed = time.perf_counter() - start
        CPU_TO_PROMPT.append(_cpu_seconds(pid))
        share = None
        if idle:
            _drain(fd, settle)
            c0, t0 = _cpu_seconds(pid), time.perf_counter()
            _drain(fd, idle)
            share = (_cpu_seconds(pid) - c0) / (time.perf_counter() - t0)
        return elapsed, share
    finally:
        os.kill(pid, signal.SIGTERM)
        end = time.perf_counter() + 30
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.perf_counter() > end:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            _drain(fd, 0.05)
        os.close(fd)


def _drain(fd: int, seconds: float) -> None:
    """Read the console for `seconds`, as a terminal would."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.perf_counter()))
        if r:
            try:
                os.read(fd, 65536)
            except OSError:
                return


def _row(name: str, xs: list[float], fmt: str = "{:.2f}") -> str:
    return f"| {name} | {fmt.format(min(xs))} | {fmt.format(statistics.median(xs))} | {fmt.format(max(xs))} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--engine", default=default_engine(), choices=ENGINES)
    ap.add_argument("--kernel", default="default", choices=("default", "debian"),
                    help="the lean default kernel, or Debian trixie's stock riscv64 kernel")
    ap.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                    help="after the prompt, measure each VMM's host CPU while the guest idles")
    ap.add_argument("--settle", type=float, default=5.0, metavar="SECONDS",
                    help="wait this long after the prompt before measuring idle CPU")
    ap.add_argument("--code-cache", default="warm", choices=("warm", "off"),
                    help="pyvirt's native code cache: filled by a boot before the counted ones, or off")
    args = ap.parse_args()
    if args.code_cache == "off":
        os.environ["PYVIRT_CODE_CACHE"] = "off"
    img = default_image(build=True, progress=False)
    kernel = img.kernel
    if args.kernel == "debian":
        from pyvirt.images.debian_kernel import build_debian_kernel
        kernel = build_debian_kernel()
    ours = [sys.executable, "-m", "pyvirt", "run", "--engine", args.engine, "--cpus", str(args.cpus),
            "--memory", args.memory, "--kernel", str(kernel), "--initrd", str(img.initrd),
            "--append", img.cmdline]
    qemu = ["qemu-system-riscv64", "-M", "virt", "-smp", str(args.cpus), "-m", args.memory, "-nographic",
            "-kernel", str(kernel), "-initrd", str(img.initrd), "-append", img.cmdline]
    p_times, q_times, p_idle, q_idle, p_cpu, q_cpu = [], [], [], [], [], []
    if args.code_cache == "warm":
        time_to_prompt(ours)
    for _ in range(args.runs):
        t, share = time_to_prompt(ours, idle=args.idle, settle=args.settle)
        p_times.append(t)
        p_cpu.append(CPU_TO_PROMPT[-1])
        if share is not None:
            p_idle.append(100 * share)
        t, share = time_to_prompt(qemu, idle=args.idle, settle=args.settle)
        q_times.append(t)
        q_cpu.append(CPU_TO_PROMPT[-1])
        if share is not None:
            q_idle.append(100 * share)
    p, q = statistics.median(p_times), statistics.median(q_times)
    print(f"boot to shell prompt, {args.kernel} kernel ({kernel.name} in {kernel.parent.name}), "
          f"{args.cpus} hart(s), {args.memory}, engine {args.engine}, code cache {args.code_cache}, "
          f"runs {args.runs} "
          f"({sys.implementation.name} {sys.version.split()[0]})")
    print("| VMM | min s | median s | max s |")
    print("|---|---:|---:|---:|")
    print(_row("pyvirt", p_times))
    print(_row("qemu-system-riscv64 (TCG)", q_times))
    print(f"\npyvirt / QEMU: {p / q:.1f}x")
    print("\nCPU seconds (user + system) used by the prompt")
    print("| VMM | min s | median s | max s |")
    print("|---|---:|---:|---:|")
    print(_row("pyvirt", p_cpu))
    print(_row("qemu-system-riscv64 (TCG)", q_cpu))
    print(f"\npyvirt / QEMU in CPU time: {statistics.median(p_cpu) / statistics.median(q_cpu):.1f}x")
    if args.idle:
        print(f"\nhost CPU while the guest idles at its prompt ({args.idle:g} s, from {args.settle:g} s "
              "after it), % of one core")
        print("| VMM | min | median | max |")
        print("|---|---:|---:|---:|")
        print(_row("pyvirt", p_idle))
        print(_row("qemu-system-riscv64 (TCG)", q_idle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
