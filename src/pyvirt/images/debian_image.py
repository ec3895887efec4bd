"""The Debian guest: trixie riscv64 with systemd, on an ext4 disk, with Debian's kernel.

    pyvirt image build debian        # minutes the first time, then cached
    pyvirt run --image debian        # root has no password (no console getty yet)

How it is built (`build_debian_image`):

1. `debootstrap --foreign` (first stage, on the host) fetches Debian trixie's
   riscv64 packages through the machine's Debian mirror, checks them against
   the archive keyring and unpacks them into a directory tree.  Nothing of
   riscv64 runs yet.
2. Debian's stock riscv64 kernel package (the one `linux-image-riscv64`
   names) is unpacked into the same tree: /boot/vmlinux-* and every module
   under /usr/lib/modules.  pyvirt's own guest files go in: the command runner
   (`pyvirt-command` and its systemd unit), the guest agent (`pyvirt-agent`
   and its unit, images/agent.py), /etc/fstab, /etc/hostname.
3. `mke2fs -d` turns the tree into a raw ext4 disk image.
4. An initramfs is written on the host: Debian's busybox-static, the kernel
   modules the root disk needs (virtio-mmio, virtio-blk, ext4 and their
   dependencies, ordered from each module's .modinfo) and pyvirt's Debian
   /init (data/debian/init).
5. **The second stage runs inside a VM**: the Debian kernel boots with that
   initramfs and `pyvirt.setup=1`, mounts the disk and chroots into it to run
   data/debian/setup -- `debootstrap --second-stage` (every package's
   configuration, riscv64 maintainer scripts), `depmod`, the passwordless root
   account, systemd-networkd.  The VM reports the script's exit status through
   the test finisher.  The VM is pyvirt itself by default (about 18 minutes
   here, 1.6x qemu-system-riscv64 side by side: BENCHMARKS.md) or, with
   `configure_with="qemu"`, qemu-system-riscv64.  No qemu-user or binfmt_misc
   (global host state) is involved either way.
6. The disk is checked with `e2fsck -fn` and the result cached as
   debian-<key>/{disk.img, Image, initrd.cpio, manifest.json}, the key
   covering the package index, the kernel and busybox packages, the package
   list and pyvirt's guest scripts.

At run time the cached disk is a read-only base: `pyvirt run --image debian`
boots a fresh qcow2 overlay over it (thrown away at exit unless --root-disk
names a file to keep).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pyvirt.errors import BuildError
from pyvirt.images import cache
from pyvirt.images.agent import agent_source, build_agent
from pyvirt.images.progress import Progress

DEBIAN_IMAGE_VERSION = "1"
SUITE = "trixie"
ARCH = "riscv64"
# What debootstrap installs beyond minbase (it resolves their dependencies).
# ioping: the in-guest random I/O benchmark (bench/disk_debian.py); dd is coreutils'.
# iperf3: the in-guest network benchmark (bench/net_debian.py).
PACKAGES = ("systemd-sysv", "udev", "kmod", "e2fsprogs", "iproute2", "procps", "netbase",
            "busybox-static", "ioping", "iperf3")
ROOT_MODULES = ("virtio_mmio", "virtio_blk", "ext4")
DISK_SIZE = 2 << 30
SETUP_MEMORY = 1 << 30
SETUP_TIMEOUT = 4 * 3600.0           # seconds of the second stage before it is declared hung
# systemd waits 90 s (of guest time, which runs at host speed) for a device unit to appear; under
# emulation udev's coldplug takes longer than that, and serial-getty@ttyS0 -- the console login --
# failed with "Timed out waiting for device dev-ttyS0.device".  Devices get 15 minutes.
DEBIAN_CMDLINE = "console=ttyS0 root=/dev/vda rw systemd.default_device_timeout_sec=900"
DATA_FILES = ("init", "setup", "pyvirt-command", "pyvirt-command.service", "pyvirt-agent.service")


@dataclass(frozen=True)
class DebianImage:
    kernel: Path                # Debian's riscv64 Image
    initrd: Path                # pyvirt's initramfs for it (root-disk modules + /init)
    disk: Path                  # the raw ext4 root file system (read-only base)
    cmdline: str = DEBIAN_CMDLINE


def data_file(name: str) -> bytes:
    return resources.files("pyvirt.images").joinpath(f"data/debian/{name}").read_bytes()


def scripts_digest() -> str:
    """A hash of pyvirt's guest scripts: a change to any of them makes a new image."""
    h = hashlib.sha256()
    for name in DATA_FILES:
        h.update(name.encode() + b"\0" + data_file(name) + b"\0")
    h.update(b"agent\0" + agent_source())
    return h.hexdigest()


def image_dir(index_sha256: str, kernel_sha256: str, busybox_sha256: str) -> Path:
    key = cache.key("debian-image", DEBIAN_IMAGE_VERSION, SUITE, ARCH, " ".join(PACKAGES),
                    index_sha256, kernel_sha256, busybox_sha256, scripts_digest(), str(DISK_SIZE))
    return cache.cache_root() / f"debian-{key}"


def _image_from(final: Path) -> DebianImage:
    return DebianImage(final / "Image", final / "initrd.cpio", final / "disk.img")


def cached_debian_image() -> DebianImage | None:
    """The newest cached Debian image built with the current scripts (no network needed), or None."""
    best: tuple[str, Path] | None = None
    digest = scripts_digest()
    for manifest in cache.cache_root().glob("debian-*/manifest.json"):
        try:
            m = json.loads(manifest.read_text())
            ok = (m.get("version") == DEBIAN_IMAGE_VERSION and m.get("scripts_sha256") == digest
                  and m.get("packages") == list(PACKAGES))
            built = str(m.get("built", ""))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        img = _image_from(manifest.parent)
        if ok and all(p.is_file() for p in (img.kernel, img.initrd, img.disk)) and \
                (best is None or built > best[0]):
            best = (built, manifest.parent)
    return _image_from(best[1]) if best else None


def debian_image(build: bool = True, progress: bool = True, configure_with: str = "pyvirt") -> DebianImage:
    """The Debian image from the cache, or built now (BuildError when not built and not `build`)."""
    from pyvirt.images.progress import make_progress
    found = cached_debian_image()
    if found is not None:
        return found
    if not build:
        raise BuildError("the Debian image is not built: run `pyvirt image build debian`")
    with make_progress(progress) as reporter:
        return build_debian_image(reporter, configure_with=configure_with)


def root_overlay(img: DebianImage, keep: str | None) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """The root disk to boot: `keep` (a qcow2 overlay over the image, made when missing) or a
    throw-away overlay in a temporary directory (returned, for the caller to clean up)."""
    from pyvirt.backends.qcow2_tools import create_qcow2
    if keep is not None:
        path = Path(keep)
        if not path.exists():
            create_qcow2(str(path), None, backing=str(img.disk), backing_format="raw")
        return path, None
    tmp = tempfile.TemporaryDirectory(prefix="pyvirt-debian-")
    path = Path(tmp.name) / "root.qcow2"
    try:
        create_qcow2(str(path), None, backing=str(img.disk), backing_format="raw")
    except BaseException:
        tmp.cleanup()
        raise
    return path, tmp


def _run_logged(cmd: list[str], log: Path, what: str, timeout: float = 3600) -> None:
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               timeout=timeout)
        except FileNotFoundError:
            raise BuildError(f"{what}: {cmd[0]} is not installed (scripts/setup-system.sh installs it)") \
                from None
        except subprocess.TimeoutExpired:
            raise BuildError(f"{what} did not finish in {timeout:.0f} s (log: {log})") from None
    if p.returncode != 0:
        raise BuildError(f"{what} failed with status {p.returncode} (log: {log})")


def first_stage(root: Path, mirror: str, log: Path) -> None:
    """debootstrap --foreign: verified riscv64 packages unpacked under `root`."""
    from pyvirt.images.debian import KEYRING
    if os.geteuid() != 0:
        raise BuildError("building the Debian image needs root (debootstrap unpacks files owned by "
                         "other users and device nodes): run it as root or with sudo")
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed (scripts/setup-system.sh installs it)")
    _run_logged(["debootstrap", "--foreign", f"--arch={ARCH}", "--variant=minbase",
                 f"--keyring={KEYRING}", f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror],
                log, "debootstrap --foreign")


def install_guest_files(root: Path) -> None:
    """pyvirt's files inside the Debian tree (before the second stage)."""
    etc = root / "etc"
    (etc / "hostname").write_text("debian\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost\n")
    (etc / "fstab").write_text("# pyvirt: the root disk is the first virtio-blk device\n"
                               "/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n")
    network = etc / "systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    (network / "80-pyvirt-dhcp.network").write_text(
        "# pyvirt: every virtio-net interface gets its address by DHCP (passt serves it)\n"
        "[Match]\nType=ether\n\n[Network]\nDHCP=yes\n")
    sbin = root / "usr/local/sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    (sbin / "pyvirt-command").write_bytes(data_file("pyvirt-command"))
    (sbin / "pyvirt-command").chmod(0o755)
    (sbin / "pyvirt-agent").write_bytes(build_agent().read_bytes())
    (sbin / "pyvirt-agent").chmod(0o755)
    units = etc / "systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    for unit in ("pyvirt-command.service", "pyvirt-agent.service"):
        (units / unit).write_bytes(data_file(unit))
        link = units / "multi-user.target.wants" / unit
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{unit}")
    (root / "pyvirt-setup").write_bytes(data_file("setup"))
    (root / "pyvirt-setup").chmod(0o755)


def install_kernel(root: Path, kernel_deb: Path) -> tuple[str, bytes]:
    """Unpack Debian's kernel package into the tree; (kernel release, Image bytes)."""
    from pyvirt.images.debian import DebFile
    from pyvirt.images.debian_kernel import extract_kernel
    deb = DebFile(kernel_deb)
    deb.extract(root)
    releases = sorted(p.name for p in (root / "usr/lib/modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise BuildError(f"expected the modules of one kernel in {kernel_deb.name}, found {releases}")
    boot = {str(p.relative_to(root)): p.read_bytes() for p in (root / "boot").iterdir() if p.is_file()}
    return releases[0], extract_kernel(boot, kernel_deb.name)["Image"]


def root_modules(root: Path, release: str) -> list[tuple[str, bytes]]:
    """(name, plain ELF) of the modules mounting an ext4 virtio disk needs, in load order."""
    from pyvirt.images.kmodules import ModuleSet
    kdir = root / "usr/lib/modules" / release
    files: dict[str, bytes] = {}
    # Everything a root-disk module could need lives in these trees; reading
    # the whole 3000-module set would take a while for nothing.
    for sub in ("kernel/drivers/virtio", "kernel/drivers/block", "kernel/fs", "kernel/lib",
                "kernel/crypto", "kernel/arch"):
        base = kdir / sub
        if base.is_dir():
            for p in base.rglob("*.ko*"):
                files[str(p.relative_to(kdir))] = p.read_bytes()
    builtin = []
    if (kdir / "modules.builtin").is_file():
        builtin = (kdir / "modules.builtin").read_text().split()
    mods = ModuleSet.from_files(files, builtin)
    return [(m.name, m.elf) for m in mods.load_order(ROOT_MODULES)]


def make_debian_initramfs(busybox: bytes, applets: list[str], modules: list[tuple[str, bytes]]) -> bytes:
    from pyvirt.images.initramfs import make_initramfs
    extra = {f"modules/{name}.ko": elf for name, elf in modules}
    extra["modules/order"] = "".join(f"{name}\n" for name, _ in modules).encode()
    return make_initramfs(busybox, applets, data_file("init"), extra, directories=("newroot",))


def make_ext4(tree: Path, disk: Path, size: int, log: Path) -> None:
    _run_logged(["mke2fs", "-q", "-t", "ext4", "-L", "debian-root", "-d", str(tree), "-F", str(disk),
                 f"{size >> 20}M"], log, "mke2fs (the Debian root file system)")


class _LogConsole:
    """The build VM's console: to the build log, `pyvirt-setup:` lines also to the progress."""

    def __init__(self, log: Path, progress: Progress) -> None:
        self.f = open(log, "ab", buffering=0)     # unbuffered: the log can be watched
        self.progress = progress
        self.line = b""
        self.tail: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.line += data
        while b"\n" in self.line:
            one, self.line = self.line.split(b"\n", 1)
            one = one.rstrip(b"\r")
            self.tail = (self.tail + [one])[-20:]
            if one.startswith(b"pyvirt-setup: "):
                self.progress.step(one[14:].decode("utf-8", "replace"))

    def set_input_handler(self, handler: object) -> None:
        pass

    def fileno(self) -> int | None:
        return None

    def poll(self) -> None:
        pass

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def second_stage(kernel: Path, initrd: Path, disk: Path, log: Path, progress: Progress,
                 engine: str | None = None, timeout: float = SETUP_TIMEOUT) -> float:
    """Boot the Debian kernel in pyvirt to configure the packages; returns the seconds it took."""
    from pyvirt.engines import default_engine
    from pyvirt.spec import DiskSpec, make_spec
    from pyvirt.vmm.vm import Vm
    spec = make_spec(memory=SETUP_MEMORY, kernel=kernel, initrd=initrd,
                     append="console=ttyS0 pyvirt.setup=1", disks=[DiskSpec(path=disk, format="raw")],
                     engine=engine or default_engine())
    console = _LogConsole(log, progress)
    start = time.monotonic()
    try:
        vm = Vm(spec, console)
        try:
            code = vm.run(timeout=timeout)
        finally:
            vm.close()
    finally:
        console.close()
    if code is None:
        raise BuildError(f"the second stage did not finish in {timeout:.0f} s (log: {log})")
    if code != 0:
        tail = b" | ".join(console.tail[-3:]).decode("utf-8", "replace")
        raise BuildError(f"the second stage in the VM failed with status {code}: {tail} (log: {log})")
    return time.monotonic() - start


def second_stage_qemu(kernel: Path, initrd: Path, disk: Path, log: Path,
                      timeout: float = SETUP_TIMEOUT) -> float:
    """The same second stage under qemu-system-riscv64 (the same kernel, initramfs and disk;
    QEMU's virt board has the same test finisher, so its exit status is the script's)."""
    if shutil.which("qemu-system-riscv64") is None:
        raise BuildError("qemu-system-riscv64 is not installed (scripts/setup-system.sh installs it)")
    cmd = ["qemu-system-riscv64", "-M", "virt", "-m", str(SETUP_MEMORY >> 20), "-display", "none",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0 pyvirt.setup=1",
           "-drive", f"file={disk},format=raw,if=none,id=root", "-device", "virtio-blk-device,drive=root",
           "-monitor", "none", "-serial", "stdio"]
    start = time.monotonic()
    _run_logged(cmd, log, "the second stage under QEMU", timeout)
    return time.monotonic() - start


CONFIGURE_WITH = ("qemu", "pyvirt")


def unconfigured_image(scratch: Path, archive: Any, kpkg: Any, bpkg: Any, log: Path,
                       progress: Progress) -> tuple[float, str, list[tuple[str, bytes]]]:
    """Steps 1-4: Image, initrd.cpio and disk.img (not yet configured) in `scratch`;
    (seconds of the first stage, kernel release, the initramfs's modules)."""
    from pyvirt.images.debian import DebFile
    from pyvirt.images.initramfs import BUSYBOX_PATHS, busybox_applets

    root = scratch / "root"
    progress.step(f"fetching Debian {SUITE} {ARCH} packages (debootstrap --foreign)")
    t0 = time.monotonic()
    first_stage(root, archive.mirror, log)
    t_first = time.monotonic() - t0
    progress.step(f"unpacking {kpkg.name} {kpkg.version}")
    release, image = install_kernel(root, archive.download_package(kpkg))
    install_guest_files(root)
    progress.step("writing the initramfs")
    bdeb = DebFile(archive.download_package(bpkg))
    inside = next((p for p in BUSYBOX_PATHS if p in set(bdeb.names())), None)
    if inside is None:
        raise BuildError(f"{bpkg.name} has no busybox binary")
    busybox = bdeb.read(inside)
    exe = scratch / "busybox"
    exe.write_bytes(busybox)
    exe.chmod(0o755)
    modules = root_modules(root, release)
    initrd_bytes = make_debian_initramfs(busybox, busybox_applets(exe), modules)
    (scratch / "initrd.cpio").write_bytes(initrd_bytes)
    (scratch / "Image").write_bytes(image)
    progress.step("making the ext4 root file system")
    make_ext4(root, scratch / "disk.img", DISK_SIZE, log)
    shutil.rmtree(root)
    return t_first, release, modules


def build_debian_image(progress: Progress | None = None, engine: str | None = None,
                       configure_with: str = "pyvirt") -> DebianImage:
    """The cached Debian image, built if missing (root needed).

    `configure_with`: where the riscv64 second stage runs: "pyvirt" (a pyvirt VM, the
    default: 1.6x QEMU's time here, BENCHMARKS.md) or "qemu" (qemu-system-riscv64)."""
    if configure_with not in CONFIGURE_WITH:
        raise BuildError(f"unknown --configure-with {configure_with!r} (qemu or pyvirt)")
    from pyvirt.images.debian import DebianArchive
    from pyvirt.images.debian_kernel import METAPACKAGE, image_package_name
    from pyvirt.images.initramfs import BUSYBOX_PACKAGE

    progress = progress or Progress()
    archive = DebianArchive(SUITE, ARCH, progress=progress)
    index = archive.release().files.get(f"main/binary-{ARCH}/Packages") or \
        archive.release().files.get(f"main/binary-{ARCH}/Packages.xz")
    if index is None:
        raise BuildError(f"Debian {SUITE}'s InRelease lists no {ARCH} package index")
    kpkg = archive.package(image_package_name(archive.package(METAPACKAGE).depends))
    bpkg = archive.package(BUSYBOX_PACKAGE)
    final = image_dir(index.sha256, kpkg.sha256, bpkg.sha256)
    if (final / "manifest.json").is_file():
        return _image_from(final)
    with cache.lock(final.name):
        if (final / "manifest.json").is_file():
            return _image_from(final)
        log = cache.log_path(f"{final.name}.log")
        log.write_bytes(b"")
        scratch = cache.scratch_dir(final.name)
        started = time.monotonic()
        try:
            t_first, release, modules = unconfigured_image(scratch, archive, kpkg, bpkg, log, progress)
            disk = scratch / "disk.img"
            progress.step(f"configuring the packages inside a {configure_with} VM (debootstrap --second-stage)")
            if configure_with == "pyvirt":
                t_second = second_stage(scratch / "Image", scratch / "initrd.cpio", disk, log, progress, engine)
            else:
                t_second = second_stage_qemu(scratch / "Image", scratch / "initrd.cpio", disk, log)
            progress.step("checking the file system (e2fsck -fn)")
            _run_logged(["e2fsck", "-fn", str(disk)], log, "e2fsck of the new Debian disk")
            with cache.building(final) as out:
                for name in ("disk.img", "Image", "initrd.cpio"):
                    os.replace(scratch / name, out / name)
                (out / "disk.img").chmod(0o444)
                manifest = {"version": DEBIAN_IMAGE_VERSION, "suite": SUITE, "arch": ARCH,
                            "packages": list(PACKAGES), "kernel_package": kpkg.name,
                            "kernel_version": kpkg.version, "kernel_release": release,
                            "busybox_version": bpkg.version, "index_sha256": index.sha256,
                            "scripts_sha256": scripts_digest(), "root_modules": [n for n, _ in modules],
                            "first_stage_s": round(t_first, 1), "second_stage_s": round(t_second, 1),
                            "configured_with": configure_with,
                            "total_s": round(time.monotonic() - started, 1),
                            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        progress.note(f"Debian image built in {time.monotonic() - started:.0f} s "
                      f"(second stage in {configure_with}: {t_second:.0f} s): {final}")
    return _image_from(final)
