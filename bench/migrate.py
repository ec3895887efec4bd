"""Live migration of the default guest between two processes over a Unix socket
(pyvirt.testing.migrate: the source here, the destination a child process).

    PYTHONPATH=src .venv/bin/python bench/migrate.py [--memory 256M,1G] [--runs 5] [--quick]

For each memory size and workload -- idle (the 10 ms ticker, which also gives the gap the
guest itself sees) and writing (the ticker's loop copying 16 MiB in tmpfs over and over) --
migrate once the guest printed 20 ticks, `--runs` times for 256 MiB idle and once for the
others, and print total time, bytes sent, rounds, the stop-and-copy pause (the downtime the
source measures) and the largest gap in the guest's own ticks across the move, next to the
defaults QEMU publishes for its pre-copy migration.  Writes nothing: copy the table into
BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from pyvirt.spec import parse_size
from pyvirt.testing.migrate import TICKER, migrate_once, ticks

WRITER = ("mkdir -p /m; mount -t tmpfs -o size=64m tmpfs /m; dd if=/dev/urandom of=/m/a bs=1M count=16 "
          "2>/dev/null; i=0; while true; do i=$((i+1)); cp /m/a /m/b; read up x < /proc/uptime; "
          "echo \"tick $i $up\"; done")
QEMU = ("QEMU's published defaults (migration parameters): downtime-limit 300 ms, max-bandwidth "
        "128 MiB/s, auto-converge off (cpu-throttle-initial 20 %, increment 10 % when on)")


def gap(src: str, dst: str) -> float | None:
    before, after = ticks(src), ticks(dst)
    if not before or not after:
        return None
    return after[0][1] - before[-1][1]


def one(memory: str, command: str, after: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        stats, src, dst, _ = migrate_once(Path(d), command, after=after, memory=memory, dest_seconds=4.0)
    if stats.outcome != "completed":
        raise SystemExit(f"migration {stats.outcome}: {stats.error}")
    return {"total": stats.total_seconds, "mib": stats.bytes_sent / 2**20, "rounds": stats.rounds,
            "pause_ms": stats.downtime_seconds * 1000, "gap": gap(src, dst) or float("nan"),
            "throttle": stats.throttle}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", default="256M,1G")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for memory in args.memory.split(","):
        parse_size(memory)
        for name, command, after in (("idle", TICKER, 20), ("writing", WRITER, 2)):
            runs = args.runs if (name == "idle" and memory == args.memory.split(",")[0]) else 1
            results = [one(memory, command, after) for _ in range(runs)]
            rows.append((memory, name, runs, results))
            r = results
            print(f"{memory} {name}: " + ", ".join(f"{k} {statistics.median(x[k] for x in r):.3g}" for k in r[0]),
                  flush=True)
    print()
    print("| guest | workload | runs | total s | MiB sent | rounds | pause ms (median / max) "
          "| guest's tick gap s (median / max) | throttle |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for memory, name, runs, r in rows:
        med = {k: statistics.median(x[k] for x in r) for k in r[0]}
        top = {k: max(x[k] for x in r) for k in r[0]}
        print(f"| {memory} | {name} | {runs} | {med['total']:.2f} | {med['mib']:.0f} | {med['rounds']:.0f} | "
              f"{med['pause_ms']:.0f} / {top['pause_ms']:.0f} | {med['gap']:.2f} / {top['gap']:.2f} | "
              f"{med['throttle']:.0%} |")
    print()
    print(QEMU)


if __name__ == "__main__":
    main()
