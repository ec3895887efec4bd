"""Data the guest saw flushed survives `kill -9` of the VMM (raw and qcow2 images).

The guest writes files of random data to an ext4 disk, records each file's
checksum, and runs `sync` before announcing it on the console; the test kills
the VMM with SIGKILL at a different point of each round, mid-workload.  The
next boot mounts the disk (the guest kernel replays ext4's journal) and checks
every announced file against its checksum; at the end e2fsck finds the file
system clean, and for qcow2 `qemu-img check` accepts the image after every
kill (leaked clusters allowed, nothing else).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirt.testing.guest import pyvirt

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


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_flushed_writes_survive_kill_9(default_image, tmp_path: Path, fmt: str) -> None:
    img = tmp_path / f"crash.{fmt}"
    raw = tmp_path / "fs.raw"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", str(raw), "32M"], check=True)
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(img)], check=True)
    else:
        raw.rename(img)
    announced = 0
    for extra in (2, 3, 1):                       # kill at a different point each round
        announced = _kill_after(img, announced + extra)
        if fmt == "qcow2":                        # consistent after every kill (leaks allowed)
            check = subprocess.run(["qemu-img", "check", "-q", str(img)], capture_output=True, text=True)
            assert check.returncode in (0, 3), check.stdout + check.stderr
    r = pyvirt("run", "--disk", str(img), "--command", VERIFY)
    assert r.code == 0, r.out + r.err
    lines = r.out.split()
    ok = int(lines[0])
    assert ok >= announced, f"only {ok} of the {announced} files the guest synced are intact:\n{r.out}"
    assert len(lines) == 1, f"files with bad checksums:\n{r.out}"
    if fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", "-q", str(img)], capture_output=True, text=True)
        assert check.returncode in (0, 3), check.stdout + check.stderr      # 3: leaked clusters only
        subprocess.run(["qemu-img", "convert", "-q", "-O", "raw", str(img), str(raw)], check=True)
        img = raw
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
