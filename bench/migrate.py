"""Live migration of the default guest between two processes over a Unix socket, over TCP
with a one-time token and over TCP with mutual TLS and the token (pyvirt.testing.migrate:
the source here, the destination a child process; with TLS each end's TLS in a process of
its own, pyvirt.testing.tlsproxy, as pyvirtd's relay: credentials made with openssl).

    PYTHONPATH=src .venv/bin/python bench/migrate.py [--memory 256M,1G] [--runs 5] [--no-disk]
                                                     [--transport unix,tcp,tls] [--only-idle]

For each memory size and workload -- idle (the 10 ms ticker, which also gives the gap the
guest itself sees) and writing (the ticker's loop copying 16 MiB in tmpfs over and over) --
migrate once the guest printed 20 ticks, `--runs` times for 256 MiB idle (on each transport)
and once for the others (over the first transport), and print total time, bytes sent, rounds,
the stop-and-copy pause (the downtime the source measures), the gap in the guest's own ticks
across the move, the largest gap between two ticks from the migration's start to the
destination's end (what the ticker sees of the whole migration) and, as the loaded host's
noise floor, the largest gap between two ticks at the source before the migration began,
next to the defaults QEMU publishes for its pre-copy migration.  Then, unless --no-disk, the same with a
disk copied (copy_storage, libvirt's --copy-storage-all): a 256 MiB guest with a 256 MiB raw
disk holding 64 MiB of data, idle (the ticker) and writing (the ticker's loop writing 1 MiB
to the disk, fsynced, each tick).  Writes nothing: copy the table into BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from pyvirt.spec import parse_size
from pyvirt.testing.migrate import TICKER, migrate_once, ticks

WRITER = ("mkdir -p /m; mount -t tmpfs -o size=64m tmpfs /m; dd if=/dev/urandom of=/m/a bs=1M count=16 "
          "2>/dev/null; i=0; while true; do i=$((i+1)); cp /m/a /m/b; read up x < /proc/uptime; "
          "echo \"tick $i $up\"; done")
DISK_WRITER = ("i=0; while true; do i=$((i+1)); dd if=/dev/urandom of=/dev/vda bs=64k count=16 "
               "seek=$(( (i % 64) * 16 )) conv=fsync 2>/dev/null; read up x < /proc/uptime; "
               "echo \"tick $i $up\"; done")
NAMES = {"unix": "Unix socket", "tcp": "TCP, token", "tls": "TCP, TLS + token"}
QEMU = ("QEMU's published defaults (migration parameters): downtime-limit 300 ms, max-bandwidth "
        "128 MiB/s, auto-converge off (cpu-throttle-initial 20 %, increment 10 % when on)")


def gap(src: str, dst: str) -> float | None:
    before, after = ticks(src), ticks(dst)
    if not before or not after:
        return None
    return after[0][1] - before[-1][1]


def largest(t: list[tuple[int, float]]) -> float:
    return max((b[1] - a[1] for a, b in zip(t, t[1:])), default=float("nan"))


def still_gap(src: str, after: int) -> float:
    """The largest gap between two ticks at the source before the migration began (tick
    `after` started it): what the loaded host alone does to the guest (the noise floor)."""
    return largest([t for t in ticks(src) if t[0] <= after])


def migration_gap(src: str, dst: str, after: int) -> float:
    """The largest gap between two ticks from the migration's start (tick `after`) through
    the move to the destination's last tick."""
    return largest([t for t in ticks(src) if t[0] >= after] + ticks(dst))


def one(memory: str, command: str, after: int, disk: bool = False, transport: str = "unix",
        creds: Path | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        kw: dict[str, object] = {}
        if disk:
            path = Path(d) / "disk.raw"
            with open(path, "wb") as f:
                f.truncate(256 << 20)
                for off in range(0, 256 << 20, 4 << 20):       # 64 MiB of data, spread over it
                    f.seek(off)
                    f.write(os.urandom(1 << 20))
            kw = {"disks": [f"{path},format=raw"], "copy_storage": True}
        stats, src, dst, _ = migrate_once(Path(d), command, after=after, memory=memory, dest_seconds=4.0,
                                          tcp=transport != "unix", tls=creds if transport == "tls" else None, **kw)
    if stats.outcome != "completed":
        raise SystemExit(f"migration {stats.outcome}: {stats.error}")
    return {"total": stats.total_seconds, "mib": stats.bytes_sent / 2**20, "rounds": stats.rounds,
            "pause_ms": stats.downtime_seconds * 1000, "gap": gap(src, dst) or float("nan"),
            "during": migration_gap(src, dst, after), "still": still_gap(src, after),
            "throttle": stats.throttle, "disk_mib": stats.blocks_sent * 64 / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", default="256M,1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-disk", action="store_true", help="skip the runs with a disk copied")
    ap.add_argument("--transport", default="unix,tcp", help="unix, tcp (with a token), tls (TCP with mutual "
                                                             "TLS and the token), comma-separated")
    ap.add_argument("--only-idle", action="store_true", help="only the first memory size's idle runs")
    args = ap.parse_args()
    first = args.memory.split(",")[0]
    transports = args.transport.split(",")
    if not set(transports) <= {"unix", "tcp", "tls"}:
        raise SystemExit("--transport: unix, tcp, tls, comma-separated")
    creds = None
    if "tls" in transports:
        from pyvirt.testing.tlscerts import make_creds
        creds = make_creds(Path(tempfile.mkdtemp(prefix="pyvirt-bench-tls-")))
    cases = [(memory, name, command, after, False) for memory in args.memory.split(",")
             for name, command, after in (("idle", TICKER, 20), ("writing", WRITER, 2))]
    if not args.no_disk:
        cases += [("256M", "disk copy, idle", TICKER, 20, True),
                  ("256M", "disk copy, disk writing", DISK_WRITER, 5, True)]
    if args.only_idle:
        cases = cases[:1]
    rows = []
    for memory, name, command, after, disk in cases:
        parse_size(memory)
        main_row = name == "idle" and memory == first
        for transport in transports if main_row else transports[:1]:
            runs = args.runs if main_row else 1
            results = [one(memory, command, after, disk, transport, creds) for _ in range(runs)]
            rows.append((memory, name, transport, runs, results))
            print(f"{memory} {name} {transport}: " + ", ".join(
                f"{k} {statistics.median(x[k] for x in results):.3g}" for k in results[0]), flush=True)
    print()
    print("| guest | workload | transport | runs | total s | MiB sent | disk blocks MiB | rounds "
          "| pause ms (median / max) | tick gap across the move s (median / max) "
          "| largest gap of the migration s (median / max) | largest gap before it s (median / max) | throttle |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for memory, name, transport, runs, r in rows:
        med = {k: statistics.median(x[k] for x in r) for k in r[0]}
        top = {k: max(x[k] for x in r) for k in r[0]}
        print(f"| {memory} | {name} | {NAMES[transport]} | {runs} | "
              f"{med['total']:.2f} | {med['mib']:.0f} | {med['disk_mib']:.0f} | {med['rounds']:.0f} | "
              f"{med['pause_ms']:.0f} / {top['pause_ms']:.0f} | {med['gap']:.3f} / {top['gap']:.3f} | "
              f"{med['during']:.3f} / {top['during']:.3f} | {med['still']:.3f} / {top['still']:.3f} | "
              f"{med['throttle']:.0%} |")
    print()
    print(QEMU)
    if creds is not None:
        shutil.rmtree(creds, ignore_errors=True)


if __name__ == "__main__":
    main()
