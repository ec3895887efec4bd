"""pyvirtd end to end: boot, snapshot, restore, clone, memory per VM (not a test).

    .venv/bin/python bench/hypervisor.py [--memory 256M,1G] [--fill MB] [--clones 4]

Starts a pyvirtd of its own on a temporary state directory and, through its
API (pyvirt.Client), for each memory size:

* boot: POST /vms + start, until the guest's command prints its first line;
* snapshot: the guest has filled `--fill` MiB of its tmpfs with random data
  (so RAM is really used); POST /vms/NAME/snapshots (the VM goes on); the
  snapshot's size is its allocated disk blocks;
* restore: POST /snapshots/NAME/restore, until the restored guest prints a
  new line (it prints one every 0.2 s, so this includes up to 0.2 s of its
  own sleep);
* clones (first size only): POST /snapshots/NAME/clone with count N, until
  every clone printed a line under its new host name;
* memory: each runner's RSS and PSS (/proc/PID/smaps_rollup) and the Rss of
  its guest RAM mapping (/proc/PID/smaps): overhead = RSS minus the RAM
  mapping's Rss (the guest RAM it touched).

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvirt.host.client import Client
from pyvirt.spec import parse_size

MIB = 1 << 20


def guest_cmd(fill: int) -> str:
    return ("echo booted; h0=$(hostname); "
            f"head -c 1048576 /dev/urandom > /tmp/a; for i in $(seq {fill}); do cat /tmp/a; done > /tmp/fill; "
            "i=0; while true; do i=$((i+1)); echo T=$i H=$(hostname); sleep 0.2; done")


def wait(pred, limit: float, what: str):   # noqa: ANN001, ANN201
    end = time.monotonic() + limit
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.01)


def mem(pid: int, memory: int) -> dict[str, int]:
    """rss, pss of the process; ram_rss: Rss of its guest RAM mapping (the one of RAM's size)."""
    roll = Path(f"/proc/{pid}/smaps_rollup").read_text()
    out = {k.lower(): int(re.search(rf"^{k}:\s+(\d+) kB", roll, re.M).group(1)) * 1024 for k in ("Rss", "Pss")}
    out["ram_rss"] = 0
    size = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            size = int(m.group(2), 16) - int(m.group(1), 16)
        elif line.startswith("Rss:") and size is not None and memory <= size <= memory + 2 * 4096:
            out["ram_rss"] += int(line.split()[1]) * 1024
    return out


def fmt_mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"


def bench(c: Client, memory: int, fill: int, clones: int) -> list[tuple[str, str]]:
    tag = f"m{memory >> 20}"
    rows: list[tuple[str, str]] = []
    t0 = time.monotonic()
    c.create(tag, memory=memory, command=guest_cmd(fill))
    c.start(tag)
    wait(lambda: "booted" in c.logs(tag)["text"], 120, "boot")
    rows.append((f"create + boot to the command's first output, {memory >> 20} MiB",
                 f"{time.monotonic() - t0:.2f} s"))
    wait(lambda: "T=3 " in c.logs(tag)["text"], 300, "the fill")
    base = mem(c.inspect(tag)["pid"], memory)
    rows.append((f"runner RSS / guest RAM touched / overhead, booted {memory >> 20} MiB guest",
                 f"{fmt_mib(base['rss'])} / {fmt_mib(base['ram_rss'])} / {fmt_mib(base['rss'] - base['ram_rss'])}"))
    t0 = time.monotonic()
    s = c.snapshot(tag, f"{tag}-snap")
    rows.append((f"snapshot (API call; VM goes on), {memory >> 20} MiB, {fill} MiB filled",
                 f"{time.monotonic() - t0:.2f} s, {fmt_mib(s['size'])} on disk"))
    c.kill(tag)
    t0 = time.monotonic()
    c.restore(f"{tag}-snap", name=f"{tag}-r")
    t_api = time.monotonic() - t0
    wait(lambda: re.search(r"T=\d+", c.logs(f"{tag}-r")["text"]), 60, "the restored guest")
    rows.append((f"restore, {memory >> 20} MiB: API call / until the guest prints again",
                 f"{t_api * 1000:.0f} ms / {(time.monotonic() - t0) * 1000:.0f} ms"))
    r = mem(c.inspect(f"{tag}-r")["pid"], memory)
    rows.append((f"restored VM: RSS / RAM mapping Rss / overhead, {memory >> 20} MiB",
                 f"{fmt_mib(r['rss'])} / {fmt_mib(r['ram_rss'])} / {fmt_mib(r['rss'] - r['ram_rss'])}"))
    c.delete(f"{tag}-r", force=True)
    if clones:
        t0 = time.monotonic()
        vms = c.clone(f"{tag}-snap", clones, prefix=f"{tag}-c")
        t_api = time.monotonic() - t0
        for v in vms:
            wait(lambda n=v["name"]: f"H={n}\n" in c.logs(n)["text"], 120, f"{v['name']}'s host name")
        rows.append((f"clone x{clones}, {memory >> 20} MiB: API call / until all print their new host name",
                     f"{t_api:.2f} s / {time.monotonic() - t0:.2f} s"))
        ms = [mem(v["pid"], memory) for v in vms]
        rows.append((f"{clones} clones: total PSS / total RSS / {clones} x guest RAM",
                     f"{fmt_mib(sum(m['pss'] for m in ms))} / {fmt_mib(sum(m['rss'] for m in ms))} / "
                     f"{fmt_mib(clones * memory)}"))
        for v in vms:
            c.delete(v["name"], force=True)
    c.delete(tag, force=True)
    c.delete_snapshot(f"{tag}-snap")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="256M,1G")
    ap.add_argument("--fill", type=int, default=64, help="MiB of random data the guest writes to its tmpfs")
    ap.add_argument("--clones", type=int, default=4, help="clones of the first size's snapshot")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="pvb-", dir="/tmp"))
    log = open(state / "daemon.log", "ab")
    daemon = subprocess.Popen([sys.executable, "-m", "pyvirt.host.daemon", "--state-dir", str(state)],
                              stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    rows: list[tuple[str, str]] = []
    try:
        c = Client(state_dir=state)
        wait(lambda: _answers(c), 20, "pyvirtd")
        for i, m in enumerate(args.memory.split(",")):
            rows += bench(c, parse_size(m), args.fill, args.clones if i == 0 else 0)
    finally:
        with contextlib.suppress(Exception):
            for v in c.list():
                c.delete(v["name"], force=True)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=20)
        shutil.rmtree(state, ignore_errors=True)
    print(f"pyvirtd, default guest, {os.cpu_count()} CPUs, --fill {args.fill} MiB\n")
    print("| measurement | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


def _answers(c: Client) -> bool:
    try:
        c.info()
        return True
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
