"""A system-call heavy guest program inside the full system, pyvirt next to QEMU, in one run.

    .venv/bin/python bench/syscalls.py [--runs N] [--rounds N] [--engine E] [--kernel default|debian]

bench/guest/syscalls.c (riscv64-linux-gnu-gcc -O2, static) does N rounds of
getuid, a 64-byte pipe write and the read back: three system calls a round,
each a trap into the guest kernel and back.  It is added to the default
initramfs (a second cpio archive after it) and run by the guest's /init
(`pyvirt.cmd=`, what `pyvirt run --command` does) under pyvirt and under
qemu-system-riscv64 with the same kernel, initramfs and command line.  The
program times its loop itself with CLOCK_MONOTONIC, so boot time is left out.

Guest MIPS for the loop: pyvirt counts instructions; the loop's count is the
difference between runs of N and N/10 rounds (the rest of the run is the
same), scaled to N rounds and divided by the in-guest time of the N-round run.  QEMU's MIPS uses
pyvirt's instruction count, as bench/mips.py does.
"""

from __future__ import annotations

import argparse
import base64
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pyvirt.engines import ENGINES, default_engine
from pyvirt.images import default_image
from pyvirt.images.cpio import CpioWriter

HERE = Path(__file__).resolve().parent
CFLAGS = ["-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector", "-march=rv64gc"]
RESULT = re.compile(r"syscalls (\d+) (\d+) ns (\d+)")
STATS = re.compile(r"pyvirt: ([\d,]+) instructions")


def make_initrd(base: Path, tmp: Path, program: str = "syscalls") -> Path:
    """`base` with bench/guest/<program>.c, compiled, added as /<program>."""
    exe = tmp / program
    subprocess.run(["riscv64-linux-gnu-gcc", *CFLAGS, "-o", str(exe), str(HERE / "guest" / f"{program}.c")],
                   check=True)
    w = CpioWriter()
    w.file(program, exe.read_bytes(), mode=0o755)
    out = tmp / "initrd.cpio"
    out.write_bytes(base.read_bytes() + w.to_bytes())      # the kernel unpacks both archives
    return out


def run(argv: list[str]) -> tuple[int, int, int, int | None]:
    """(rounds, checksum, loop ns, pyvirt's instruction count or None)."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    m = RESULT.search(p.stdout)
    if not m:
        raise RuntimeError(f"{argv[0]}: no result (exit {p.returncode}): {p.stdout[-400:]!r} {p.stderr[-400:]!r}")
    s = STATS.search(p.stderr)
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), int(s.group(1).replace(",", "")) if s else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--engine", default=default_engine(), choices=ENGINES)
    ap.add_argument("--kernel", default="default", choices=("default", "debian"))
    args = ap.parse_args()
    img = default_image(build=True, progress=False)
    kernel = img.kernel
    if args.kernel == "debian":
        from pyvirt.images.debian_kernel import build_debian_kernel
        kernel = build_debian_kernel()
    small = max(1, args.rounds // 10)
    with tempfile.TemporaryDirectory() as tmp:
        initrd = make_initrd(img.initrd, Path(tmp))

        def ours(n: int) -> list[str]:
            return [sys.executable, "-m", "pyvirt", "run", "--engine", args.engine, "--kernel", str(kernel),
                    "--initrd", str(initrd), "--append", img.cmdline, "--stats", "--command", f"/syscalls {n}"]

        def qemu(n: int) -> list[str]:
            cmd = base64.b64encode(f"/syscalls {n}".encode()).decode()
            append = " ".join(a for a in img.cmdline.split() if not a.startswith("earlycon"))
            return ["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-nographic", "-kernel", str(kernel),
                    "-initrd", str(initrd), "-append", f"{append} quiet loglevel=0 pyvirt.cmd={cmd}"]

        p_ns, q_ns, per_round = [], [], []
        checksum = None
        for _ in range(args.runs):
            n_big, sum_big, ns_big, ins_big = run(ours(args.rounds))
            _, _, ns_small, ins_small = run(ours(small))
            _, q_sum, q_time, _ = run(qemu(args.rounds))
            if q_sum != sum_big or (checksum is not None and checksum != sum_big):
                raise RuntimeError(f"checksums differ: pyvirt {sum_big}, qemu {q_sum}")
            checksum = sum_big
            p_ns.append(ns_big)
            q_ns.append(q_time)
            assert ins_big is not None and ins_small is not None
            per_round.append((ins_big - ins_small) / (args.rounds - small))
    calls = 3 * args.rounds
    p, q = statistics.median(p_ns), statistics.median(q_ns)
    loop_ins = statistics.median(per_round) * args.rounds
    print(f"system-call loop: {args.rounds} rounds ({calls} syscalls), {args.kernel} kernel, engine {args.engine}, "
          f"runs {args.runs} ({sys.implementation.name} {sys.version.split()[0]})")
    print("| VMM | loop s (min / median / max) | syscalls/s | guest MIPS |")
    print("|---|---:|---:|---:|")
    print(f"| pyvirt | {min(p_ns) / 1e9:.2f} / {p / 1e9:.2f} / {max(p_ns) / 1e9:.2f} | {calls / p * 1e9:,.0f} | "
          f"{loop_ins / p * 1e3:.1f} |")
    print(f"| qemu-system-riscv64 (TCG) | {min(q_ns) / 1e9:.3f} / {q / 1e9:.3f} / {max(q_ns) / 1e9:.3f} | "
          f"{calls / q * 1e9:,.0f} | {loop_ins / q * 1e3:.1f} |")
    print(f"\nguest instructions per round (pyvirt): {loop_ins / args.rounds:,.0f}; pyvirt / QEMU: {p / q:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
