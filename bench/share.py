"""Shared-folder (virtio-fs) throughput inside the guest, pyvirt next to QEMU, in one run.

    .venv/bin/python bench/share.py [--runs N] [--mib N] [--files N] [--engine E]

Both VMMs boot the same default kernel and initramfs with a fresh host directory holding
an N MiB file made on the host, shared as tag `work` through the same virtiofsd
(/usr/lib/qemu/virtiofsd, the same options: backends/virtiofsd.py `virtiofsd_argv`), and
mounted by /init on /mnt/work.  QEMU: `-object memory-backend-memfd,share=on` and
`-device vhost-user-fs-device` (virtio-mmio, modern: `force-legacy=false`).  Inside the guest, busybox dd reads the
host's file (1 MiB blocks; not in the guest's page cache yet) and writes a new file of the
same size (1 MiB blocks, then fsync); then the shell creates small files (echo x > sN).
The guest's /proc/uptime (1/100 s) brackets each step.
Needs root (virtiofsd).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvirt.backends.virtiofsd import virtiofsd_argv
from pyvirt.engines import ENGINES, default_engine
from pyvirt.images import DefaultImage, default_image

LINE = re.compile(r"^(R|W|C) (\d+) ([\d.]+) ([\d.]+)$", re.M)

# busybox dd prints no timing: the guest's /proc/uptime (1/100 s) brackets each step
SCRIPT = """cd /mnt/work || exit 9
up() {{ cut -d' ' -f1 /proc/uptime; }}
t0=$(up); dd if=big of=/dev/null bs=1M 2>/dev/null; echo "R {nbytes} $t0 $(up)"
t0=$(up); dd if=/dev/zero of=out bs=1M count={mib} conv=fsync 2>/dev/null; echo "W {nbytes} $t0 $(up)"
t0=$(up); i=0
while [ $i -lt {files} ]; do echo x > s$i; i=$((i + 1)); done
echo "C {files} $t0 $(up)"
"""


def measure(out: str, who: str) -> dict[str, float]:
    """MB/s for R and W, files/s for C."""
    got: dict[str, float] = {}
    for m in LINE.finditer(out):
        seconds = max(float(m.group(4)) - float(m.group(3)), 0.01)
        got[m.group(1)] = int(m.group(2)) / seconds / (1e6 if m.group(1) in "RW" else 1)
    if set(got) != {"R", "W", "C"}:
        raise RuntimeError(f"{who}: incomplete result: {out[-600:]!r}")
    return got


def fresh_share(tmp: Path, mib: int) -> Path:
    d = tmp / "share"
    subprocess.run(["rm", "-rf", str(d)], check=True)
    d.mkdir()
    (d / "big").write_bytes(os.urandom(mib << 20))
    return d


def run_pyvirt(img: DefaultImage, share: Path, script: str, engine: str) -> str:
    argv = [sys.executable, "-m", "pyvirt", "run", "--engine", engine, "--kernel", str(img.kernel),
            "--initrd", str(img.initrd), "--share", f"{share}:work", "--command", script]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    return p.stdout + p.stderr


def run_qemu(img: DefaultImage, share: Path, script: str, tmp: Path) -> str:
    sock_path = str(tmp / "vfs.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    listener.bind(sock_path)
    listener.listen(1)
    fsd = subprocess.Popen(virtiofsd_argv(share, listener.fileno(), read_only=False), pass_fds=[listener.fileno()],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listener.close()
    try:
        cmd64 = base64.b64encode(script.encode()).decode()
        append = f"console=ttyS0 quiet loglevel=0 pyvirt.share=work pyvirt.cmd={cmd64}"
        argv = ["qemu-system-riscv64", "-M", "virt,memory-backend=mem", "-m", "256M",
                "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-nographic",
                "-global", "virtio-mmio.force-legacy=false",          # (libvhost-user: no legacy)
                "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", append,
                "-chardev", f"socket,id=vfs,path={sock_path}",
                "-device", "vhost-user-fs-device,chardev=vfs,tag=work"]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        return p.stdout + p.stderr
    finally:
        fsd.terminate()
        fsd.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--engine", default=default_engine(), choices=ENGINES)
    args = ap.parse_args()
    img = default_image(build=True, progress=False)
    script = SCRIPT.format(mib=args.mib, nbytes=args.mib << 20, files=args.files)
    results: dict[str, dict[str, list[float]]] = {"pyvirt": {}, "qemu": {}}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for _ in range(args.runs):
            for who in ("pyvirt", "qemu"):
                share = fresh_share(tmp, args.mib)
                start = time.monotonic()
                out = run_pyvirt(img, share, script, args.engine) if who == "pyvirt" else run_qemu(img, share, script, tmp)
                r = measure(out, who)
                if (share / "out").stat().st_size != args.mib << 20:
                    raise RuntimeError(f"{who}: the written file has the wrong size")
                for k, v in r.items():
                    results[who].setdefault(k, []).append(v)
                results[who].setdefault("wall", []).append(time.monotonic() - start)
    names = {"R": "read of a host file (MB/s)", "W": "write + fsync (MB/s)",
             "C": f"small files created (files/s, {args.files})", "wall": "whole run, boot included (s)"}
    print(f"shared folder (virtio-fs, virtiofsd cache=auto) inside the guest: {args.mib} MiB, "
          f"engine {args.engine}, runs {args.runs}")
    print("| workload | pyvirt (min / median / max) | QEMU (min / median / max) | pyvirt / QEMU |")
    print("|---|---:|---:|---:|")
    for k, name in names.items():
        p, q = results["pyvirt"][k], results["qemu"][k]

        def fmt(xs: list[float]) -> str:
            return " / ".join(f"{x:,.1f}" for x in (min(xs), statistics.median(xs), max(xs)))
        print(f"| {name} | {fmt(p)} | {fmt(q)} | {statistics.median(p) / statistics.median(q):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
