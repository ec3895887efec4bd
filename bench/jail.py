"""Jailed vs unjailed daemon VMs (issue 14, item 2; host/jail.py), not a test.

    .venv/bin/python bench/jail.py [--runs 5] [--loop 200000]
    .venv/bin/python bench/jail.py --foreground [--runs 5] [--loop 100000]

Starts two pyvirtds of its own on temporary state directories, one with the
jail (the default) and one with `--no-jail`, and for each run, alternating
between them: a default-guest VM (64 MiB) from start until its command
prints READY (boot), then a shell loop of `--loop` iterations (CPU-bound
guest work through the run loop's system calls) until it prints DONE.
Prints the medians and each run.

`--foreground`: `pyvirt run --stats` and `pyvirt run --jail --stats`, runs
alternating, on the default guest: boot (`--command true`: boot, run it,
power off) and a shell loop of `--loop` iterations; each figure is the
process's CPU time (user + system, from wait4) and guest instructions per
CPU second, so that the load of a shared machine mostly cancels out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hypervisor import _answers, wait

from pyvirt import Client


def one(c: Client, name: str, loop: int) -> tuple[float, float]:
    c.create(name, memory="64M", command=f"echo READY; i=0; while [ $i -lt {loop} ]; do i=$((i+1)); done; echo DONE")
    t0 = time.monotonic()
    c.start(name)
    wait(lambda: "READY" in c.logs(name)["text"], 120, "READY")
    t1 = time.monotonic()
    wait(lambda: "DONE" in c.logs(name)["text"], 600, "DONE")
    t2 = time.monotonic()
    wait(lambda: c.inspect(name)["state"] != "running", 60, "the VM's end")
    c.delete(name)
    return t1 - t0, t2 - t1


def run_once(jail: bool, command: str) -> tuple[float, int]:
    """CPU seconds and guest instructions of one `pyvirt run [--jail] --stats --command`."""
    argv = [sys.executable, "-m", "pyvirt", "run", "--quiet", "--stats", "--command", command,
            *(["--jail"] if jail else [])]
    with tempfile.TemporaryDirectory(prefix="pvjf-") as cwd:
        p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        assert p.stderr is not None
        err = p.stderr.read().decode()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    m = re.search(r"([\d,]+) instructions", err)
    if p.returncode != 0 or m is None:
        raise SystemExit(f"pyvirt run failed ({p.returncode}): {err[-500:]}")
    return ru.ru_utime + ru.ru_stime, int(m.group(1).replace(",", ""))


def foreground(runs: int, loop: int) -> int:
    cmds = {"boot": "true", "loop": f"i=0; while [ $i -lt {loop} ]; do i=$((i+1)); done"}
    res: dict[tuple[str, bool], list[tuple[float, int]]] = {(k, j): [] for k in cmds for j in (False, True)}
    for _ in range(runs):
        for what, cmd in cmds.items():
            for jail in (False, True):
                res[(what, jail)].append(run_once(jail, cmd))
    print("| measurement | jail off, median (runs) | jail on, median (runs) | on / off |\n|---|---|---|---|")
    for what in cmds:
        off = [c for c, _ in res[(what, False)]]
        on = [c for c, _ in res[(what, True)]]
        mo, mn = statistics.median(off), statistics.median(on)
        print(f"| {what}: CPU s | {mo:.2f} ({', '.join(f'{x:.2f}' for x in off)}) "
              f"| {mn:.2f} ({', '.join(f'{x:.2f}' for x in on)}) | {mn / mo:.3f} |")
        mips_off = [n / c / 1e6 for c, n in res[(what, False)]]
        mips_on = [n / c / 1e6 for c, n in res[(what, True)]]
        a, b = statistics.median(mips_off), statistics.median(mips_on)
        print(f"| {what}: MIPS per CPU s | {a:.2f} ({', '.join(f'{x:.2f}' for x in mips_off)}) "
              f"| {b:.2f} ({', '.join(f'{x:.2f}' for x in mips_on)}) | {b / a:.3f} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--loop", type=int, default=None)
    ap.add_argument("--foreground", action="store_true", help="pyvirt run with and without --jail")
    args = ap.parse_args()
    if args.foreground:
        return foreground(args.runs, args.loop or 100000)
    args.loop = args.loop or 200000
    daemons: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    res: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    try:
        for mode in res:
            state = Path(tempfile.mkdtemp(prefix="pvj-", dir="/tmp"))
            log = open(state / "daemon.log", "ab")
            daemons[mode] = (subprocess.Popen([sys.executable, "-m", "pyvirt.host.daemon", "--state-dir", str(state),
                                               *(["--no-jail"] if mode == "off" else [])],
                                              stdout=log, stderr=log, stdin=subprocess.DEVNULL), state)
            wait(lambda s=state: _answers(Client(state_dir=s)), 20, "pyvirtd")
        for r in range(args.runs):
            for mode, (_, state) in daemons.items():
                res[mode].append(one(Client(state_dir=state), f"b{r}", args.loop))
    finally:
        for proc, state in daemons.values():
            with contextlib.suppress(Exception):
                c = Client(state_dir=state)
                for v in c.list():
                    c.delete(v["name"], force=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
            shutil.rmtree(state, ignore_errors=True)
    print("| jail | boot to READY, median (runs) | loop, median (runs) |\n|---|---|---|")
    for mode, v in res.items():
        boots, loops = [a for a, _ in v], [b for _, b in v]
        print(f"| {mode} | {statistics.median(boots):.2f} s ({', '.join(f'{x:.2f}' for x in boots)}) "
              f"| {statistics.median(loops):.2f} s ({', '.join(f'{x:.2f}' for x in loops)}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
