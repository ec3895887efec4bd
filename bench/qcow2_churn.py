"""A guest that writes, discards and flushes its qcow2 disk in a loop must not fill the host
disk (issue 14): the image file stays under twice the disk's virtual size and `qemu-img
check` finds it clean.

    .venv/bin/python bench/qcow2_churn.py [--seconds 60] [--mib 64] [--engine E]

The default guest loops for SECONDS (and, for a test, on until it did a number of rounds): dd 16 MiB (of zeros: the device cannot tell) into one
of four 16 MiB slots of /dev/vda with conv=fsync, blkdiscard it again (every other round
`blkdiscard -z`, WRITE_ZEROES), sync; then it prints ROUNDS N.  The script prints the
rounds, the image's apparent and allocated size after the run, and the check's result;
it exits 1 when the file reached 2x the virtual size or the check is not clean.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pyvirt.backends.qcow2_tools import create_qcow2
from pyvirt.engines import ENGINES, default_engine
from pyvirt.testing import qemu_img as q

LOOP = ("end=$(( $(date +%s) + {secs} )); i=0; "
        "while [ $(date +%s) -lt $end ] || [ $i -lt {rounds} ]; do s=$(( i % 4 * 16 )); "
        "dd if=/dev/zero of=/dev/vda bs=1M count=16 seek=$s conv=fsync 2>/dev/null; "
        "if [ $((i % 2)) = 0 ]; then blkdiscard -o $((s << 20)) -l 16777216 /dev/vda; "
        "else blkdiscard -z -o $((s << 20)) -l 16777216 /dev/vda; fi; sync; i=$((i+1)); done; "
        "echo ROUNDS $i")


def churn(seconds: int, mib: int = 64, engine: str | None = None, workdir: Path | None = None,
          min_rounds: int = 0) -> dict:
    """Run the guest loop for `seconds`, and on until `min_rounds` rounds are done (a test
    needs the rounds, whatever the machine's load); returns rounds, apparent and allocated
    size, and the check."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        disk = Path(tmp) / "churn.qcow2"
        create_qcow2(disk, mib << 20)
        p = subprocess.run([sys.executable, "-m", "pyvirt", "run", "--memory", "128M",
                            "--engine", engine or default_engine(),
                            "--disk", f"{disk},format=qcow2", "--command", LOOP.format(secs=seconds, rounds=min_rounds)],
                           capture_output=True, text=True, timeout=seconds + 600, stdin=subprocess.DEVNULL)
        rounds = [int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("ROUNDS ")]
        st = os.stat(disk)
        return {"rounds": rounds[0] if rounds else None, "exit": p.returncode, "size": st.st_size,
                "allocated": st.st_blocks * 512, "virtual": mib << 20, "check": q.check(disk),
                "tail": (p.stdout + p.stderr)[-600:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--engine", default=None, choices=ENGINES)
    args = ap.parse_args()
    r = churn(args.seconds, args.mib, args.engine)
    chk = r["check"]
    print(f"rounds {r['rounds']} (guest exit {r['exit']}); image {r['size'] >> 20} MiB apparent, "
          f"{r['allocated'] >> 20} MiB allocated, virtual {r['virtual'] >> 20} MiB; "
          f"qemu-img check exit {chk['returncode']}, leaks {chk.get('leaks', 0)}, "
          f"corruptions {chk.get('corruptions', 0)}")
    ok = (r["rounds"] and r["size"] < 2 * r["virtual"] and r["allocated"] < 2 * r["virtual"]
          and chk["returncode"] == 0)
    if not ok:
        print(r["tail"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
