"""Guest MIPS on CPU-bound programs, pyvirt next to qemu-riscv64, in one run.

    .venv/bin/python bench/mips.py [--runs N] [--engine E] [--reps N]

Each program in bench/guest/ is compiled (riscv64-linux-gnu-gcc -O2, static,
freestanding), run on pyvirt's engine in U-mode (pyvirt.testing.usermode,
which counts retired instructions exactly) and under qemu-riscv64.  Both must
print the same result.  MIPS for QEMU uses pyvirt's instruction count (the
same binary executes the same instructions).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvirt.engines import ENGINES, default_engine
from pyvirt.testing.usermode import run_elf

HERE = Path(__file__).resolve().parent
PROGRAMS = ("intloop", "sort", "hashtab")
CFLAGS = ["-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector", "-march=rv64gc"]


def build(name: str, out: Path, reps: int = 1) -> Path:
    exe = out / name
    subprocess.run(["riscv64-linux-gnu-gcc", *CFLAGS, f"-DREPS={reps}", "-o", str(exe),
                    str(HERE / "guest" / f"{name}.c")], check=True)
    return exe


def time_qemu(exe: Path) -> tuple[float, bytes]:
    t = time.perf_counter()
    p = subprocess.run(["qemu-riscv64", str(exe)], capture_output=True, check=True)
    return time.perf_counter() - t, p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engine", default=default_engine(), choices=ENGINES)
    ap.add_argument("--reps", type=int, default=None,
                    help="repeat each program's work N times (default: 50 for native, else 1), "
                         "so that runs last long enough to time")
    args = ap.parse_args()
    reps = args.reps or (50 if args.engine == "native" else 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in PROGRAMS:
            exe = build(name, Path(tmp), reps)
            ours, qemu = [], []
            count = 0
            for _ in range(args.runs):
                t = time.perf_counter()
                r = run_elf(exe, engine=args.engine, max_instructions=20_000_000_000)
                ours.append(time.perf_counter() - t)
                qt, qout = time_qemu(exe)
                qemu.append(qt)
                if r.exit_code != 0 or r.stdout != qout:
                    print(f"{name}: results differ: pyvirt {r.stdout!r} qemu {qout!r}", file=sys.stderr)
                    return 1
                count = r.instructions
            o, q = statistics.median(ours), statistics.median(qemu)
            rows.append((name, count, o, count / o / 1e6, q, count / q / 1e6, o / q))
    print(f"engine: {args.engine}, work repeated {reps}x, median of {args.runs} runs, "
          f"{sys.implementation.name} {sys.version.split()[0]}")
    print("| program | instructions | pyvirt s | pyvirt MIPS | qemu-riscv64 s | qemu MIPS | pyvirt/qemu time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, count, o, om, q, qm, ratio in rows:
        print(f"| {name} | {count:,} | {o:.2f} | {om:.1f} | {q:.3f} | {qm:.0f} | {ratio:.0f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
