"""`pyvirt run --oci IMAGE true`, cold and warm, against the same guest's plain boot and QEMU.

    .venv/bin/python bench/oci.py [--runs N] [--image PATH]

IMAGE is the busybox test image (pyvirt.testing.oci: Debian's busybox-static riscv64 in three
layers) written as an OCI layout, unless --image names another.  Timed from process start to
exit, each run in a fresh process:

  cold       a fresh PYVIRT_OCI_CACHE: the blobs copied and checked, the layers applied, the
             ext4 base disk written, then the boot
  warm       the same cache again: no copy, no conversion (the base disk's mtime is checked)
  plain      `pyvirt run --command true` on the default guest (same kernel and initramfs, no
             container disk)
  qemu       qemu-system-riscv64 (TCG) booting the same kernel, the container initrd (stdio on
             the console) and a qcow2 overlay on the same base disk, to its power-off

It prints a Markdown table for BENCHMARKS.md ("Containers: pyvirt run --oci").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, timeout=900)
    elapsed = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({p.returncode}): {p.stderr.decode(errors='replace')[-400:]}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--image", help="an image to run instead of the busybox test image")
    args = ap.parse_args()
    from pyvirt.images import default_image
    from pyvirt.testing import oci as t
    work = Path(tempfile.mkdtemp(prefix="pyvirt-bench-oci-"))
    try:
        image = args.image
        if image is None:
            layers = t.busybox_layers(t.busybox_binary())
            t.write_layout(work / "busybox", t.image_config(layers, **t.BUSYBOX_CONFIG), layers)
            image = str(work / "busybox")
        py = [sys.executable, "-m", "pyvirt", "run", "-q"]
        rows: dict[str, list[float]] = {"cold": [], "convert": [], "warm": [], "plain": [], "qemu": []}
        for i in range(args.runs):
            env = dict(os.environ, PYVIRT_OCI_CACHE=str(work / f"cache{i}"))
            rows["cold"].append(_timed([*py, "--oci", image, "true"], env))
            rows["convert"].append(_convert(image, work / f"convert{i}"))
            disk = next((work / f"cache{i}" / "images").glob("*/rootfs.ext4"))
            mtime = disk.stat().st_mtime_ns
            rows["warm"].append(_timed([*py, "--oci", image, "true"], env))
            assert disk.stat().st_mtime_ns == mtime, "the warm run converted the image again"
            rows["plain"].append(_timed([*py, "--command", "true"], env))
            rows["qemu"].append(_qemu(image, env, work))
        img = default_image(build=False)
        print(f"| run ({args.runs} each, median (all)) | seconds |\n|---|---|")
        names = {"cold": "pyvirt run --oci, cold (copy, unpack, mke2fs, boot)",
                 "convert": "of which the conversion alone (in process: resolve, unpack, mke2fs)", "warm": "pyvirt run --oci, warm",
                 "plain": "pyvirt run --command true (plain default guest)",
                 "qemu": "qemu-system-riscv64 (TCG), same kernel, initrd and base disk"}
        for key, xs in rows.items():
            print(f"| {names[key]} | {statistics.median(xs):.2f} ({', '.join(f'{x:.2f}' for x in xs)}) |")
        print(f"\nkernel {img.kernel}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _convert(image: str, cache: Path) -> float:
    """Seconds to resolve and convert the image into an empty cache (no boot)."""
    os.environ["PYVIRT_OCI_CACHE"] = str(cache)
    from pyvirt.oci import base_disk, resolve_image
    start = time.perf_counter()
    base_disk(resolve_image(image))
    return time.perf_counter() - start


def _qemu(image: str, env: dict[str, str], work: Path) -> float:
    """QEMU booting the container (stdio on the console) from the warm cache."""
    os.environ["PYVIRT_OCI_CACHE"] = env["PYVIRT_OCI_CACHE"]
    from pyvirt.images import default_image
    from pyvirt.oci import RunOptions, container_guest
    img = default_image(build=False)
    guest = container_guest(image, RunOptions(command=["true"], stdio="console"), img.initrd)
    try:
        argv = ["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-nographic", "-no-reboot", "-kernel",
                str(img.kernel), "-initrd", str(guest.initrd), "-append", guest.append,
                "-drive", f"file={guest.root},if=none,id=root,format=qcow2", "-device", "virtio-blk-device,drive=root"]
        return _timed(argv, env)
    finally:
        if guest.tmp is not None:
            guest.tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
