"""Snapshot and restore of the default guest: save time, snapshot size, restore time.

    .venv/bin/python bench/snapshot.py [--memory 256M,1G] [--fill MB] [--runs N]

For each memory size: boot the default guest with a command that fills `--fill`
MiB of its tmpfs with random data and then idles, take a snapshot
(`save_snapshot`, then="quit"), and restore it `--runs` times (`load_snapshot`
until the Vm is ready, then until the guest prints again after restore).
Sizes are the RAM file's apparent size and the disk blocks it takes.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyvirt.backends.char import BufferBackend
from pyvirt.images import default_image
from pyvirt.spec import make_spec, parse_size
from pyvirt.vmm.restore import load_snapshot
from pyvirt.vmm.snapshot import save_snapshot
from pyvirt.vmm.vm import Vm


def run_until(vm: Vm, con: BufferBackend, pattern: bytes, limit: float = 600) -> None:
    end = time.monotonic() + limit
    while pattern not in con.output:
        if time.monotonic() > end or vm.run(timeout=0.2) is not None:
            sys.exit(f"guest did not print {pattern!r}: {bytes(con.output[-300:])!r}")


def bench(memory: int, fill: int, runs: int, work: Path) -> dict[str, float]:
    img = default_image(build=True)
    cmd = (f"dd if=/dev/urandom of=/tmp/fill bs=1M count={fill} 2>/dev/null; echo ready; "
           "while true; do echo tick; sleep 1; done")
    append = " ".join([img.cmdline.replace("earlycon=sbi", ""), "quiet", "loglevel=0",
                       "pyvirt.cmd=" + base64.b64encode(cmd.encode()).decode()])
    con = BufferBackend()
    vm = Vm(make_spec(kernel=str(img.kernel), initrd=str(img.initrd), append=append, memory=memory), con)
    run_until(vm, con, b"ready\n")
    snap = work / f"snap-{memory >> 20}"
    t = time.perf_counter()
    save_snapshot(vm, snap, then="quit")
    save = time.perf_counter() - t
    vm.close()
    st = (snap / "ram").stat()
    restores, first_output = [], []
    for _ in range(runs):
        con = BufferBackend()
        t = time.perf_counter()
        clone = load_snapshot(snap, con)
        restores.append(time.perf_counter() - t)
        run_until(clone, con, b"tick\n")
        first_output.append(time.perf_counter() - t)
        clone.close()
    return {"memory_mib": memory >> 20, "save_s": save, "ram_file_mib": st.st_size / 2**20,
            "ram_allocated_mib": st.st_blocks * 512 / 2**20,
            "restore_ms": 1000 * statistics.median(restores),
            "restore_to_output_s": statistics.median(first_output)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="256M,1G")
    ap.add_argument("--fill", type=int, default=16, help="MiB of random data the guest keeps in tmpfs")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyvirt-bench-snap-"))
    try:
        print("| RAM | save | RAM file (apparent / allocated) | restore (load_snapshot) "
              "| restore to next guest output |")
        print("|---|---|---|---|---|")
        for size in args.memory.split(","):
            r = bench(parse_size(size), args.fill, args.runs, work)
            print(f"| {r['memory_mib']} MiB | {r['save_s']:.2f} s | {r['ram_file_mib']:.0f} MiB / "
                  f"{r['ram_allocated_mib']:.1f} MiB | {r['restore_ms']:.1f} ms | "
                  f"{r['restore_to_output_s']:.2f} s |", flush=True)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
