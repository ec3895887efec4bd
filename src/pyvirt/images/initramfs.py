"""The default guest's initramfs: Debian trixie's busybox-static (riscv64) and pyvirt's /init.

Layout of the (uncompressed newc) archive::

    /init                 pyvirt's /init (data/init), a busybox sh script
    /bin/pyvirt-agent     the guest agent (images/agent.py), started by /init
    /bin/busybox          from busybox-static, verified through the signed archive
    /bin/sh, /sbin/..., /usr/bin/...   a symlink to /bin/busybox per applet, at the
                          path `busybox --list-full` gives (asked of the riscv64
                          binary itself through qemu-user)
    /dev/console, /dev/null   device nodes (the kernel opens /dev/console for
                          /init before devtmpfs is mounted)
    /proc /sys /dev /tmp /root /mnt /run /var /etc   directories, /etc/passwd etc.

The result is cached under a key of the busybox .deb's SHA256, the /init text,
the agent's source and INITRAMFS_VERSION.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

from pyvirt.errors import BuildError
from pyvirt.images import cache
from pyvirt.images.agent import agent_source, build_agent
from pyvirt.images.cpio import CpioWriter
from pyvirt.images.progress import Progress

INITRAMFS_VERSION = "2"
SUITE = "trixie"
ARCH = "riscv64"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATHS = ("usr/bin/busybox", "bin/busybox")    # where the package has had it
_APPLET_PATH = re.compile(r"[A-Za-z0-9_.+\[\]-]+(/[A-Za-z0-9_.+\[\]-]+)*")
DIRECTORIES = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root", "mnt", "etc",
               "run", "var")


def init_script() -> bytes:
    return resources.files("pyvirt.images").joinpath("data/init").read_bytes()


def initramfs_dir(busybox_sha256: str) -> Path:
    """The cache directory of the initramfs built from this busybox .deb and the current /init."""
    key = cache.key("initramfs", INITRAMFS_VERSION, busybox_sha256, init_script(), agent_source())
    return cache.cache_root() / f"initramfs-{key}"


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of every applet ("bin/sh", "usr/bin/base64"), asked of busybox under qemu-user."""
    if shutil.which("qemu-riscv64") is None:
        raise BuildError("qemu-riscv64 is needed to list the busybox applets (install qemu-user)")
    try:
        p = subprocess.run(["qemu-riscv64", str(busybox), "--list-full"], capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"busybox --list-full under qemu-riscv64 failed: {e}") from None
    paths = [line.strip().strip("/") for line in p.stdout.splitlines() if line.strip()]
    if p.returncode != 0 or not paths:
        raise BuildError(f"busybox --list-full under qemu-riscv64 failed (status {p.returncode})")
    for path in paths:
        if ".." in path.split("/") or not _APPLET_PATH.fullmatch(path):
            raise BuildError(f"busybox listed a strange applet path {path!r}")
    return paths


def make_initramfs(busybox: bytes, applets: list[str], init: bytes,
                   files: Mapping[str, bytes] | None = None, directories: Iterable[str] = (),
                   agent: bytes | None = None) -> bytes:
    """The archive's bytes (see the module docstring for its layout), plus `files`
    ({path: contents}, mode 0644) and `directories`."""
    w = CpioWriter()
    for d in (*DIRECTORIES, *directories):
        w.directory(d)
    w.char_device("dev/console", 5, 1, 0o600)
    w.char_device("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox, 0o755)
    for path in applets:
        if path != "bin/busybox" and path not in w:
            w.symlink(path, "/bin/busybox")
    w.file("init", init, 0o755)
    if agent is not None:
        w.file("bin/pyvirt-agent", agent, 0o755)
    w.file("etc/hostname", b"pyvirt\n")
    w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.file("etc/group", b"root:x:0:\n")
    for path, data in (files or {}).items():
        w.file(path, data)
    return w.to_bytes()


def build_initramfs(progress: Progress | None = None) -> Path:
    """The cached initramfs for the current busybox-static and /init, built if missing."""
    from pyvirt.images.debian import DebFile, DebianArchive

    progress = progress or Progress()
    archive = DebianArchive(SUITE, ARCH, progress=progress)
    pkg = archive.package(BUSYBOX_PACKAGE)
    final = initramfs_dir(pkg.sha256)
    if (final / "initramfs.cpio").is_file():
        return final / "initramfs.cpio"
    with cache.lock(final.name):
        if (final / "initramfs.cpio").is_file():
            return final / "initramfs.cpio"
        progress.step(f"fetching {pkg.name} {pkg.version} ({ARCH})")
        deb = DebFile(archive.download_package(pkg))
        names = set(deb.names())
        inside = next((p for p in BUSYBOX_PATHS if p in names), None)
        if inside is None:
            raise BuildError(f"{pkg.name} {pkg.version} has no busybox binary at {' or '.join(BUSYBOX_PATHS)}")
        busybox = deb.read(inside)
        progress.step("writing the initramfs")
        scratch = cache.scratch_dir(final.name)
        try:
            exe = scratch / "busybox"
            exe.write_bytes(busybox)
            exe.chmod(0o755)
            applets = busybox_applets(exe)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        init = init_script()
        data = make_initramfs(busybox, applets, init, agent=build_agent().read_bytes())
        with cache.building(final) as out:
            (out / "initramfs.cpio").write_bytes(data)
            manifest = {"version": INITRAMFS_VERSION, "suite": SUITE, "arch": ARCH,
                        "busybox_package": pkg.name, "busybox_version": pkg.version,
                        "busybox_sha256": pkg.sha256, "init_sha256": hashlib.sha256(init).hexdigest(),
                        "applets": len(applets),
                        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        progress.note(f"initramfs written ({len(data) >> 10} KiB, {len(applets)} applets): "
                      f"{final / 'initramfs.cpio'}")
    return final / "initramfs.cpio"


def cached_initramfs() -> Path | None:
    """The newest cached initramfs built with the current /init (no network needed), or None."""
    best: tuple[str, Path] | None = None
    for manifest in cache.cache_root().glob("initramfs-*/manifest.json"):
        try:
            m = json.loads(manifest.read_text())
            sha, built = str(m["busybox_sha256"]), str(m.get("built", ""))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        cpio = manifest.parent / "initramfs.cpio"
        if initramfs_dir(sha) == manifest.parent and cpio.is_file() and (best is None or built > best[0]):
            best = (built, cpio)
    return best[1] if best else None
