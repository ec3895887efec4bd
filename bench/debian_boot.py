"""Debian trixie with systemd: boot to `systemctl is-system-running`, pyvirt next to QEMU.

    .venv/bin/python bench/debian_boot.py [--runs N] [--engine E]

Both VMMs boot the cached Debian image (`pyvirt image build debian`): Debian's
stock kernel, pyvirt's initramfs for it and a fresh qcow2 overlay over the
root disk, 1 GiB of RAM, one hart.  The guest runs `systemctl
is-system-running` once systemd's boot has finished (pyvirt-command.service)
and ends the VM through the test finisher; the wall time of the whole VMM
process is measured, and the state printed must be `running`.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvirt.engines import ENGINES, default_engine
from pyvirt.images.debian_image import cached_debian_image

COMMAND = "systemctl is-system-running"


def timed(argv: list[str]) -> tuple[float, str]:
    t = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=1800)
    wall = time.monotonic() - t
    if "running" not in p.stdout.split():
        raise RuntimeError(f"{argv[0]}: no 'running' (exit {p.returncode}): {p.stdout[-300:]!r} {p.stderr[-300:]!r}")
    return wall, p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--engine", default=default_engine(), choices=ENGINES)
    args = ap.parse_args()
    img = cached_debian_image()
    if img is None:
        sys.exit("the Debian image is not built: run `pyvirt image build debian`")
    cmd64 = base64.b64encode(COMMAND.encode()).decode()
    append = (f"{img.cmdline} TERM=dumb systemd.show_status=0 systemd.mask=serial-getty@ttyS0.service "
              f"quiet loglevel=0 pyvirt.cmd={cmd64}")
    times: dict[str, list[float]] = {"pyvirt": [], "qemu": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for vmm in ("pyvirt", "qemu"):
                ov = Path(tmp) / f"{vmm}{i}.qcow2"
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(img.disk), "-F", "raw",
                                str(ov)], check=True)
                if vmm == "pyvirt":
                    argv = [sys.executable, "-m", "pyvirt", "run", "--kernel", str(img.kernel), "--initrd",
                            str(img.initrd), "--append", append, "--disk", f"{ov},format=qcow2", "-m", "1G",
                            "--engine", args.engine]
                else:
                    argv = ["qemu-system-riscv64", "-M", "virt", "-m", "1G", "-display", "none", "-serial",
                            "stdio", "-monitor", "none", "-kernel", str(img.kernel), "-initrd", str(img.initrd),
                            "-append", append, "-drive", f"file={ov},format=qcow2,if=none,id=d",
                            "-device", "virtio-blk-device,drive=d"]
                wall, _ = timed(argv)
                times[vmm].append(wall)
                print(f"run {i + 1} {vmm}: {wall:.1f} s", flush=True)
    p, q = statistics.median(times["pyvirt"]), statistics.median(times["qemu"])
    print(f"\n| VMM | boot to `running` (median of {args.runs}) |\n|---|---:|")
    print(f"| pyvirt ({args.engine}) | {p:.1f} s |\n| QEMU TCG | {q:.1f} s |\n\npyvirt / QEMU: {p / q:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
