"""Guest images: the default guest (lean kernel + busybox initramfs), built and cached.

`default_image()` returns the cached kernel and initramfs, building what is
missing: the kernel from Debian's linux-source-6.1 (images/kernel.py) and an
initramfs holding Debian trixie's busybox-static for riscv64, fetched and
verified by images/debian.py, plus pyvirt's own /init (data/init).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pyvirt.errors import BuildError
from pyvirt.images import cache
from pyvirt.images.cpio import CpioWriter
from pyvirt.images.kernel import build_kernel, cached_kernel

DEFAULT_CMDLINE = "console=ttyS0"
INITRAMFS_VERSION = "1"
BUSYBOX_PACKAGE = "busybox-static"


@dataclass(frozen=True)
class DefaultImage:
    kernel: Path
    initrd: Path
    cmdline: str = DEFAULT_CMDLINE


def init_script() -> bytes:
    return resources.files("pyvirt.images").joinpath("data/init").read_bytes()


def busybox_applets(busybox: Path) -> list[str]:
    """The applet list, asked of the riscv64 busybox itself through qemu-user."""
    try:
        p = subprocess.run(["qemu-riscv64", str(busybox), "--list-full"], capture_output=True,
                           text=True, timeout=60)
    except FileNotFoundError:
        raise BuildError("qemu-riscv64 (qemu-user) is needed to list busybox applets") from None
    if p.returncode != 0 or not p.stdout.strip():
        raise BuildError("busybox --list-full failed under qemu-riscv64")
    return [line.strip() for line in p.stdout.splitlines() if line.strip()]


def make_initramfs(busybox: bytes, applets: list[str], init: bytes) -> bytes:
    w = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root", "mnt", "etc",
              "run", "var"):
        w.directory(d)
    w.char_device("dev/console", 5, 1)
    w.char_device("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox, 0o755)
    for path in applets:
        if path != "bin/busybox" and path not in w:
            w.symlink(path, "/bin/busybox")
    w.file("init", init, 0o755)
    w.file("etc/hostname", b"pyvirt\n")
    w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.file("etc/group", b"root:x:0:\n")
    return w.to_bytes()


def _initramfs_dir(busybox_sha: str) -> Path:
    return cache.cache_root() / f"initramfs-{cache.key('initramfs', INITRAMFS_VERSION, busybox_sha, init_script())}"


def build_initramfs(status: Callable[[str, int, int], None] | None = None) -> Path:
    from pyvirt.images.debian import DebianArchive, deb_file
    archive = DebianArchive(progress=status)
    pkg = archive.packages().get(BUSYBOX_PACKAGE)
    if pkg is None:
        raise BuildError(f"{BUSYBOX_PACKAGE} is not in Debian trixie for riscv64")
    final = _initramfs_dir(pkg.sha256)
    if (final / "initramfs.cpio").exists():
        return final / "initramfs.cpio"
    _, deb = archive.fetch(BUSYBOX_PACKAGE)
    busybox = deb_file(deb, "/busybox")
    with cache.building(final) as out:
        exe = out / "busybox"
        exe.write_bytes(busybox)
        exe.chmod(0o755)
        applets = busybox_applets(exe)
        (out / "initramfs.cpio").write_bytes(make_initramfs(busybox, applets, init_script()))
        (out / "busybox.version").write_text(f"{pkg.name} {pkg.version} sha256:{pkg.sha256}\n")
        exe.unlink()
    return final / "initramfs.cpio"


def cached_default_image() -> DefaultImage | None:
    kernel = cached_kernel()
    if kernel is None:
        return None
    candidates = sorted(cache.cache_root().glob("initramfs-*/initramfs.cpio"),
                        key=lambda p: p.stat().st_mtime)
    # Only an initramfs built with the current /init script counts.
    for c in reversed(candidates):
        version = (c.parent / "busybox.version").read_text().split("sha256:")[-1].strip() \
            if (c.parent / "busybox.version").exists() else ""
        if version and _initramfs_dir(version) == c.parent:
            return DefaultImage(kernel, c)
    return None


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    if not enabled:
        last: list[str] = [""]

        def plain(what: str, done: int, total: int) -> None:
            if what != last[0]:
                last[0] = what
                print(f"pyvirt: {what}...", file=sys.stderr, flush=True)
        yield plain
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TextColumn("{task.fields[info]}"), transient=True) as prog:
        tasks: dict[str, int] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = prog.add_task(what, total=total or None, info="")
            info = f"{done} files" if what.startswith("compiling") else ""
            prog.update(tasks[what], completed=done, total=total or None, info=info)
        yield update


def default_image(build: bool = True, progress: bool = True) -> DefaultImage:
    """The default guest, from the cache or built now (raises BuildError on failure)."""
    found = cached_default_image()
    if found is not None:
        return found
    if not build:
        raise BuildError("the default image is not built: run `pyvirt image build`")
    with _progress(progress) as status:
        initrd = build_initramfs(status)
        kernel = build_kernel(status)
    return DefaultImage(kernel, initrd)
