"""How soon VMs restored and cloned from a snapshot answer `exec` (issue 16's point: within
1 s of their restore, with their own host name and the host's wall clock), through pyvirtd.

    .venv/bin/python bench/restore_exec.py [--rounds N] [--clones 4] [--memory 256M] [--share]

A pyvirtd of its own on a temporary state directory boots the default guest, waits for its
agent, snapshots it and waits 3 s (the snapshot's clock falls behind).  Each round then:

* restore: POST /snapshots/NAME/restore (the call returns once the guest agent has set the
  clock and the host name: host/agent.after_restore), then at once one exec of `hostname`
  (no retry), then the guest's clock read by exec (`busybox adjtimex`, microseconds) against
  the host's before and after that exec (the offset is how far outside it lies: 0 inside);
* clone: POST /snapshots/NAME/clone with count N, then the same for every clone, all at once
  (one thread each).

Per VM: the API call, the first exec after it returned, their sum (request to answer), and
the guest clock's offset.  `--share` gives the VM a shared folder (docs/shares.md: the
snapshot unmounts it, each restore reads RAM into a memfd, starts a virtiofsd and mounts it
again).  Prints medians and maxima over the rounds; not a test (the machine may be shared).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from pyvirt.testing.daemon import Daemon, wait_agent


def first_exec(c, name: str) -> tuple[float, float]:   # noqa: ANN001
    """(seconds to the first exec's answer, how far the guest's clock lies outside the host's
    clock before and after the exec that read it: 0 when inside)."""
    t0 = time.monotonic()
    code, out, _ = c.run(name, ["hostname"])
    took = time.monotonic() - t0
    if (code, out) != (0, f"{name}\n".encode()):
        sys.exit(f"{name}: hostname answered {code} {out!r}")
    before = time.time()
    code, out, _ = c.run(name, ["sh", "-c", "busybox adjtimex | awk '/tv_(u?sec)/ {print $2}'"])
    after = time.time()
    sec, usec = out.split()
    when = int(sec) + int(usec) / 1e6
    return took, max(before - when, when - after, 0.0)


def at_once(c, names: list[str]) -> dict[str, tuple[float, float]]:   # noqa: ANN001
    got: dict[str, tuple[float, float]] = {}
    threads = [threading.Thread(target=lambda n=n: got.__setitem__(n, first_exec(c, n))) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clones", type=int, default=4)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--share", action="store_true", help="give the VM a shared folder")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="pvb-", dir="/tmp"))
    d = Daemon(state)
    rows: dict[str, list[float]] = {k: [] for k in ("restore call", "restore exec", "restore total",
                                                   "clone call", "clone exec", "clone total", "clock")}
    try:
        c = d.client
        shares = []
        if args.share:
            (state / "share").mkdir()
            shares = [f"{state / 'share'}:work"]
        c.create("base", memory=args.memory, command="sleep 100000", shares=shares)
        c.start("base")
        wait_agent(c, "base")
        c.snapshot("base", "gold")
        time.sleep(3)
        c.kill("base")
        for r in range(args.rounds):
            t0 = time.monotonic()
            name = c.restore("gold", name=f"back{r}")["name"]
            call = time.monotonic() - t0
            took, off = first_exec(c, name)
            rows["restore call"].append(call)
            rows["restore exec"].append(took)
            rows["restore total"].append(call + took)
            rows["clock"].append(abs(off))
            t0 = time.monotonic()
            names = [vm["name"] for vm in c.clone("gold", args.clones, prefix=f"r{r}")]
            call = time.monotonic() - t0
            for took, off in at_once(c, names).values():
                rows["clone call"].append(call)
                rows["clone exec"].append(took)
                rows["clone total"].append(call + took)
                rows["clock"].append(abs(off))
            for n in [name, *names]:
                c.delete(n, force=True)
    finally:
        d.cleanup()
        shutil.rmtree(state, ignore_errors=True)
    print(f"| {args.memory}{', with a share' if args.share else ''}, {args.rounds} rounds "
          f"(1 restore + {args.clones} clones each) | median | max |")
    print("|---|---:|---:|")
    for k, v in rows.items():
        unit = 1000.0
        print(f"| {k} | {statistics.median(v) * unit:.0f} ms | {max(v) * unit:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
