"""Data the guest saw flushed survives `kill -9` of the VMM (raw disk images).

The guest writes files of random data to an ext4 disk, records each file's
checksum, and runs `sync` before announcing it on the console; the test kills
the VMM with SIGKILL at a different point of each round, mid-workload.  The
next boot mounts the disk (the guest kernel replays ext4's journal) and checks
every announced file against its checksum; at the end e2fsck finds the image
clean.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import pyvirt

pytestmark = pytest.mark.slow

WORKLOAD = (
    "mount /dev/vda /mnt || exit 9; cd /mnt; i=$(ls | grep -c '^f'); "
    "while true; do i=$((i+1)); dd if=/dev/urandom of=f$i bs=4096 count=24 2>/dev/null; "
    "md5sum f$i >> sums; sync; echo synced $i; done"
)
VERIFY = ("mount /dev/vda /mnt && cd /mnt && md5sum -c sums | grep -c ': OK'; md5sum -c sums | grep -v ': OK'; "
          "cd /; umount /mnt")


def _kill_after(img: Path, rounds: int, timeout: float = 600) -> int:
    """Boot with the workload; SIGKILL the VMM once `rounds` files are announced."""
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--disk", str(img), "--command", WORKLOAD],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    last = 0
    try:
        for raw in p.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("synced "):
                last = int(line.split()[1])
                if last >= rounds:
                    break
            assert time.monotonic() < deadline, "the workload made no progress"
    finally:
        p.send_signal(signal.SIGKILL)        # the VMM dies mid-write: no flush, no clean-up
        p.wait()
    return last


def test_flushed_writes_survive_kill_9(default_image, tmp_path: Path) -> None:
    img = tmp_path / "crash.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", str(img), "32M"], check=True)
    announced = 0
    for extra in (2, 3, 1):                       # kill at a different point each round
        announced = _kill_after(img, announced + extra)
    r = pyvirt("run", "--disk", str(img), "--command", VERIFY)
    assert r.code == 0, r.out + r.err
    lines = r.out.split()
    ok = int(lines[0])
    assert ok >= announced, f"only {ok} of the {announced} files the guest synced are intact:\n{r.out}"
    assert len(lines) == 1, f"files with bad checksums:\n{r.out}"
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
