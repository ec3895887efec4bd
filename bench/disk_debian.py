"""Block I/O inside the Debian guest with Debian's own tools, pyvirt next to QEMU, in one run.

    .venv/bin/python bench/disk_debian.py [--runs N] [--mib N] [--seconds S]

The Debian image (`pyvirt image build debian`) boots under pyvirt
(`pyvirt run --image debian --disk ... --command ...`) and under
qemu-system-riscv64 with the same kernel, initramfs, kernel command line and
a fresh qcow2 overlay over the same root disk.  Two more disks are attached
as virtio-blk over virtio-mmio: a raw image and a qcow2 image (64 KiB
clusters, made by `qemu-img create`), fresh for each boot.  Inside the guest,
on each of them:

* sequential write: coreutils `dd if=/dev/zero bs=1M oflag=direct conv=fsync`;
* sequential read: `dd bs=1M iflag=direct`;
* random read and random write: `ioping -R` (4 KiB requests at random
  offsets in a 64 MiB working set, O_DIRECT, as fast as it can for S
  seconds; writes with `-WWW`), IOPS from its batch output.

QEMU's drives use its default cache mode (writeback).  The boot itself is not
timed (the command starts once systemd reports the system running).

Both VMMs write through the host's page cache, and on these machines (themselves
guests of a hypervisor) a host page the host kernel never used before is slow to
fill the first time: a profile of pyvirt's sequential write into the fresh disk
file put 43% of the time in the host kernel's copy into new page-cache pages,
while writing the same range a second time ran 2.5x faster.  Whichever VMM ran
second reused the pages the first had freed.  So before each boot the script
writes and deletes a scratch file as large as the disks (`warm_host_pages`), and
the order of the two VMMs alternates from run to run.

The command waits `--settle` seconds (15) before the first transfer: when systemd
reports the system running, its services still start and settle for a while (in
pyvirt, about 2 s of the guest's CPU in the first seconds: systemd, udev,
networkd, journald, seccomp filters), and without the wait the raw rows, which come
first, measured that as much as the disk (pyvirt's raw sequential read 490 MB/s
then, 800-1,100 after a 10 s wait, in the same guest; QEMU's guest settles
sooner).  Both guests wait the same time.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pyvirt.images.debian_image import cached_debian_image

FORMATS = ("raw", "qcow2")
WORKLOADS = ("seqwrite", "seqread", "randread", "randwrite")
DD = re.compile(r"^R (\w+) (seq\w+) (\d+) bytes .* copied, ([\d.]+) s", re.M)
IOPING = re.compile(r"^R (\w+) (rand\w+) (\d+) ([\d.]+) ([\d.]+)", re.M)
SIZES = re.compile(r"^S (\w+) (\d+)$", re.M)


def guest_command(mib: int, seconds: int, settle: int = 0) -> str:
    io = f"ioping -B -R -D -s 4k -S 64m -w {seconds}"
    return ((f"sleep {settle};" if settle else "") + "for x in 'vdb raw' 'vdc qcow2'; do set -- $x; d=/dev/$1; "
            "echo S $2 $(cat /sys/block/$1/size); "
            f"echo R $2 seqwrite $(dd if=/dev/zero of=$d bs=1M count={mib} oflag=direct conv=fsync 2>&1 | tail -1); "
            f"echo R $2 seqread $(dd if=$d of=/dev/null bs=1M count={mib} iflag=direct 2>&1 | tail -1); "
            f"echo R $2 randread $({io} $d | cut -d' ' -f1-3); "
            f"echo R $2 randwrite $({io} -WWW $d | cut -d' ' -f1-3); done")


def parse(who: str, p: subprocess.CompletedProcess[str], sizes: dict[str, int]) -> dict[tuple[str, str], float]:
    out = p.stdout
    got = {m.group(1): int(m.group(2)) * 512 for m in SIZES.finditer(out)}
    if got != sizes:
        raise RuntimeError(f"{who}: the guest saw disks {got}, expected {sizes} (exit {p.returncode}): "
                           f"{out[-800:]!r} {p.stderr[-800:]!r}")
    r: dict[tuple[str, str], float] = {}
    for m in DD.finditer(out):
        r[(m.group(1), m.group(2))] = int(m.group(3)) / float(m.group(4)) / 1e6
    for m in IOPING.finditer(out):
        r[(m.group(1), m.group(2))] = float(m.group(5))      # requests per second
    if len(r) != len(FORMATS) * len(WORKLOADS):
        raise RuntimeError(f"{who}: incomplete result: {out[-1500:]!r}")
    return r


def warm_host_pages(directory: Path, size: int) -> None:
    """Write and delete `size` bytes in `directory`: the next disk files get used pages."""
    scratch = directory / "warm.tmp"
    block = bytes(1 << 20)
    with open(scratch, "wb") as f:
        for _ in range(0, size, len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    scratch.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--mib", type=int, default=48)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--settle", type=int, default=15,
                    help="seconds the guest waits before the first transfer (see above)")
    args = ap.parse_args()
    if shutil.which("qemu-system-riscv64") is None:
        sys.exit("bench/disk_debian.py: qemu-system-riscv64 is not installed (scripts/setup-system.sh)")
    img = cached_debian_image()
    if img is None:
        sys.exit("bench/disk_debian.py: build the Debian image first (pyvirt image build debian)")
    command = guest_command(args.mib, args.seconds, args.settle)
    sizes = {"raw": (args.mib + 48) << 20, "qcow2": (args.mib + 64) << 20}
    results: dict[str, dict[tuple[str, str], list[float]]] = {"pyvirt": {}, "qemu": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        disks = {f: t / f"bench.{f}" for f in FORMATS}
        root = t / "root.qcow2"
        from pyvirt.images.debian_image import DEBIAN_CMDLINE
        cmd64 = base64.b64encode(command.encode()).decode()
        append = (f"{DEBIAN_CMDLINE} TERM=dumb systemd.show_status=0 systemd.mask=serial-getty@ttyS0.service "
                  f"quiet loglevel=0 pyvirt.cmd={cmd64}")
        ours = [sys.executable, "-m", "pyvirt", "run", "--image", "debian", "--root-disk", str(root),
                "--disk", f"{disks['raw']},format=raw", "--disk", f"{disks['qcow2']},format=qcow2",
                "--command", command]
        qemu = ["qemu-system-riscv64", "-M", "virt", "-m", "1G", "-nographic", "-kernel", str(img.kernel),
                "-initrd", str(img.initrd), "-append", append,
                "-drive", f"file={root},format=qcow2,if=none,id=d0", "-device", "virtio-blk-device,drive=d0"]
        for i, f in enumerate(FORMATS, 1):
            qemu += ["-drive", f"file={disks[f]},format={f},if=none,id=d{i}", "-device",
                     f"virtio-blk-device,drive=d{i}"]
        order = [("pyvirt", ours), ("qemu", qemu)]
        for run in range(args.runs):
            for who, argv in (order if run % 2 == 0 else order[::-1]):
                root.unlink(missing_ok=True)
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(img.disk), "-F", "raw",
                                str(root)], check=True)
                for f, path in disks.items():
                    path.unlink(missing_ok=True)
                    subprocess.run(["qemu-img", "create", "-q", "-f", f, str(path), str(sizes[f])], check=True)
                warm_host_pages(t, sum(sizes.values()) * 2)
                p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=3600)
                got = parse(who, p, sizes)
                for k, v in got.items():
                    results[who].setdefault(k, []).append(v)
                print(who, {f"{a}/{b}": round(v, 1) for (a, b), v in got.items()},
                      file=sys.stderr, flush=True)
    print(f"Debian guest: dd {args.mib} MiB sequential (1 MiB, O_DIRECT), ioping -R random 4 KiB for "
          f"{args.seconds} s, after {args.settle} s of settling; runs {args.runs} ({sys.implementation.name} {sys.version.split()[0]})")
    print("| image | workload | pyvirt (median) | QEMU (median) | pyvirt / QEMU |")
    print("|---|---|---:|---:|---:|")
    for f in FORMATS:
        for w in WORKLOADS:
            unit = "MB/s" if w.startswith("seq") else "IOPS"
            p, q = statistics.median(results["pyvirt"][(f, w)]), statistics.median(results["qemu"][(f, w)])
            print(f"| {f} | {w} ({unit}) | {p:,.1f} | {q:,.1f} | {p / q:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
