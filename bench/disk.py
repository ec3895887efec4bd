"""Block I/O throughput inside the guest, pyvirt next to QEMU, in one run.

    .venv/bin/python bench/disk.py [--runs N] [--mib N] [--ops N] [--engine E] [--format raw|qcow2]

bench/guest/diskio.c (added to the default initramfs as /diskio) opens
/dev/vda with O_DIRECT and times, inside the guest: a sequential write of
N MiB in 1 MiB requests followed by fsync, the sequential read back, and
random 4 KiB writes (then fsync) and reads.  pyvirt and qemu-system-riscv64
get the same kernel, initramfs and a fresh image of the same size (raw, or
qcow2 made by `qemu-img create`, 64 KiB clusters), attached as virtio-blk
over virtio-mmio (QEMU: cache=writeback, its default).  Both must read back the same checksums.
"""

from __future__ import annotations

import argparse
import base64
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from syscalls import make_initrd  # noqa: E402

from pyvirt.engines import ENGINES, default_engine  # noqa: E402
from pyvirt.images import default_image  # noqa: E402

LINE = re.compile(r"^(seqwrite|seqread|randwrite|randread) (\d+) (\d+) (\d+)$", re.M)
WORKLOADS = ("seqwrite", "seqread", "randwrite", "randread")


def run(argv: list[str]) -> dict[str, tuple[int, int, int]]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    found = {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4))) for m in LINE.finditer(p.stdout)}
    if set(found) != set(WORKLOADS):
        raise RuntimeError(f"{argv[0]}: incomplete result (exit {p.returncode}): {p.stdout[-400:]!r} "
                           f"{p.stderr[-400:]!r}")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--engine", default=default_engine(), choices=ENGINES)
    ap.add_argument("--format", default="raw", choices=("raw", "qcow2"))
    args = ap.parse_args()
    img = default_image(build=True, progress=False)
    command = f"/diskio {args.mib} {args.ops}"
    results: dict[str, dict[str, list[float]]] = {"pyvirt": {}, "qemu": {}}
    with tempfile.TemporaryDirectory() as tmp:
        initrd = make_initrd(img.initrd, Path(tmp), "diskio")
        disk = Path(tmp) / f"disk.{args.format}"
        append = " ".join(a for a in img.cmdline.split() if not a.startswith("earlycon"))
        cmd64 = base64.b64encode(command.encode()).decode()
        ours = [sys.executable, "-m", "pyvirt", "run", "--engine", args.engine, "--kernel", str(img.kernel),
                "--initrd", str(initrd), "--disk", str(disk), "--command", command]
        qemu = ["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-nographic", "-kernel", str(img.kernel),
                "-initrd", str(initrd), "-append", f"{append} quiet loglevel=0 pyvirt.cmd={cmd64}",
                "-drive", f"file={disk},format={args.format},if=none,id=d0", "-device", "virtio-blk-device,drive=d0"]
        for _ in range(args.runs):
            sums = []
            for who, argv in (("pyvirt", ours), ("qemu", qemu)):
                disk.unlink(missing_ok=True)
                subprocess.run(["qemu-img", "create", "-q", "-f", args.format, str(disk),
                                str((args.mib + 8) << 20)], check=True)
                r = run(argv)
                sums.append((r["seqread"][2], r["randread"][2]))
                for name, (nbytes, ns, _) in r.items():
                    rate = nbytes / ns * 1e3 if name.startswith("seq") else nbytes / 4096 / ns * 1e9
                    results[who].setdefault(name, []).append(rate)
            if sums[0] != sums[1]:
                raise RuntimeError(f"checksums differ: pyvirt {sums[0]}, qemu {sums[1]}")
    print(f"guest block I/O on a {args.format} image: {args.mib} MiB sequential (1 MiB requests), {args.ops} random "
          f"4 KiB requests, O_DIRECT, engine {args.engine}, runs {args.runs} "
          f"({sys.implementation.name} {sys.version.split()[0]})")
    print("| workload | pyvirt (min / median / max) | QEMU (min / median / max) | pyvirt / QEMU |")
    print("|---|---:|---:|---:|")
    for name in WORKLOADS:
        unit = "MB/s" if name.startswith("seq") else "IOPS"
        p, q = results["pyvirt"][name], results["qemu"][name]
        print(f"| {name} ({unit}) | {min(p):,.0f} / {statistics.median(p):,.0f} / {max(p):,.0f} | "
              f"{min(q):,.0f} / {statistics.median(q):,.0f} / {max(q):,.0f} | "
              f"{statistics.median(p) / statistics.median(q):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
