"""Jailed vs unjailed daemon VMs (issue 14, item 2; host/jail.py), not a test.

    .venv/bin/python bench/jail.py [--runs 5] [--loop 200000]

Starts two pyvirtds of its own on temporary state directories, one with the
jail (the default) and one with `--no-jail`, and for each run, alternating
between them: a default-guest VM (64 MiB) from start until its command
prints READY (boot), then a shell loop of `--loop` iterations (CPU-bound
guest work through the run loop's system calls) until it prints DONE.
Prints the medians and each run.
"""

from __future__ import annotations

import argparse
import contextlib
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--loop", type=int, default=200000)
    args = ap.parse_args()
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
