"""`pyvirt image build debian`'s second stage in pyvirt next to QEMU, on the same disk.

    sudo .venv/bin/python bench/image_build.py [--together] [--only pyvirt|qemu]

Makes the unconfigured Debian image once (debootstrap --foreign, the kernel, the
initramfs, the ext4 disk: images/debian_image.py, steps 1-4), copies the disk, and runs
the second stage (debootstrap --second-stage, depmod, accounts, units) on one copy in a
pyvirt VM (`second_stage`, what `--configure-with pyvirt` runs) and on the other in
qemu-system-riscv64 (`second_stage_qemu`, the same kernel, initramfs and script).  Each
VM's wall time is printed, and each disk must pass `e2fsck -fn` afterwards.  One after
the other by default; with --together both run at once (one core each on a 2-core
machine: the same load for both).  pyvirt's native code cache starts empty, as on a
machine that never booted this kernel (a fresh clone's CI), unless --warm-code-cache.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pyvirt.images import debian_image as di
from pyvirt.images.progress import Progress


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--together", action="store_true", help="run both VMs at the same time")
    ap.add_argument("--only", choices=("pyvirt", "qemu"))
    ap.add_argument("--dir", default="/var/tmp", help="where the scratch disks go (2 GiB sparse each)")
    ap.add_argument("--warm-code-cache", action="store_true", help="use ~/.cache/pyvirt/code as it is")
    args = ap.parse_args()
    from pyvirt.images.debian import DebianArchive
    from pyvirt.images.debian_kernel import METAPACKAGE, image_package_name
    from pyvirt.images.initramfs import BUSYBOX_PACKAGE

    progress = Progress()
    archive = DebianArchive(di.SUITE, di.ARCH, progress=progress)
    kpkg = archive.package(image_package_name(archive.package(METAPACKAGE).depends))
    bpkg = archive.package(BUSYBOX_PACKAGE)
    vmms = [args.only] if args.only else ["pyvirt", "qemu"]
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="pyvirt-image-bench-") as tmp:
        scratch = Path(tmp)
        log = scratch / "build.log"
        if not args.warm_code_cache:
            from pyvirt.cpu.riscv import codecache
            for_board = codecache.for_board
            codecache.for_board = lambda root, kernel: for_board(scratch / "cache", kernel)  # type: ignore[assignment]
        di.unconfigured_image(scratch, archive, kpkg, bpkg, log, progress)
        for vmm in vmms:
            subprocess.run(["cp", "--sparse=always", str(scratch / "disk.img"), str(scratch / f"{vmm}.img")],
                           check=True)
        times: dict[str, float] = {}
        errors: dict[str, str] = {}

        def configure(vmm: str) -> None:
            disk, vlog = scratch / f"{vmm}.img", scratch / f"{vmm}.log"
            t = time.monotonic()
            try:
                if vmm == "pyvirt":
                    di.second_stage(scratch / "Image", scratch / "initrd.cpio", disk, vlog, progress)
                else:
                    di.second_stage_qemu(scratch / "Image", scratch / "initrd.cpio", disk, vlog)
                times[vmm] = time.monotonic() - t
                subprocess.run(["e2fsck", "-fn", str(disk)], check=True, capture_output=True)
            except Exception as e:                 # noqa: BLE001 - reported with its log's tail
                errors[vmm] = f"{e}; log: {vlog.read_text(errors='replace')[-800:] if vlog.exists() else ''}"
            print(f"{vmm}: {times.get(vmm, float('nan')):.1f} s{' FAILED' if vmm in errors else ''}", flush=True)

        if args.together:
            threads = [threading.Thread(target=configure, args=(v,)) for v in vmms]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        else:
            for v in vmms:
                configure(v)
        for vmm, err in errors.items():
            print(f"{vmm} failed: {err}", file=sys.stderr)
        shutil.rmtree(scratch / "root", ignore_errors=True)
    if errors:
        return 1
    print("\n| second stage in | wall s |\n|---|---:|")
    for v in vmms:
        print(f"| {v} | {times[v]:.1f} |")
    if len(times) == 2:
        print(f"\npyvirt / QEMU: {times['pyvirt'] / times['qemu']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
