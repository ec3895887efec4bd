"""Debian's stock riscv64 kernel (trixie), fetched through the signed archive.

`linux-image-riscv64` is a metapackage; it depends on exactly one
`linux-image-<version>-riscv64`, whose /boot/vmlinux-<version> is an
uncompressed RISC-V Image (with a PE/COFF header for EFI, which pyvirt's
loader skips as a boot loader does).  The Image, its config and System.map
are cached under a key of that package's SHA256 (and DEBIAN_KERNEL_VERSION).

This is the kernel the speed benchmark boots beside the lean default one; it
carries no modules here (virtio-mmio is one), so it suits an initramfs guest.
"""

from __future__ import annotations

import gzip
import json
import re
import time
import zlib
from pathlib import Path

from pyvirt.errors import BuildError
from pyvirt.images import cache
from pyvirt.images.progress import Progress

DEBIAN_KERNEL_VERSION = "1"
SUITE = "trixie"
ARCH = "riscv64"
METAPACKAGE = "linux-image-riscv64"
_IMAGE_DEP = re.compile(r"^(linux-image-[0-9][^\s(,|]*-riscv64)(?:\s*\(|\s*$)")


def image_package_name(depends: str) -> str:
    """The versioned image package a `linux-image-riscv64` Depends field names."""
    for alt in depends.split(","):
        m = _IMAGE_DEP.match(alt.strip())
        if m:
            return m.group(1)
    raise BuildError(f"{METAPACKAGE} depends on no linux-image-<version>-riscv64 ({depends!r})")


def kernel_dir(package_sha256: str) -> Path:
    return cache.cache_root() / f"debian-kernel-{cache.key(package_sha256, DEBIAN_KERNEL_VERSION)}"


def extract_kernel(members: dict[str, bytes], version_hint: str = "") -> dict[str, bytes]:
    """{'Image', 'config', 'System.map'} from a linux-image package's /boot files."""
    out: dict[str, bytes] = {}
    for name, body in members.items():
        base = name.rsplit("/", 1)[-1]
        for prefix, key in (("vmlinux-", "Image"), ("vmlinuz-", "Image"), ("config-", "config"),
                            ("System.map-", "System.map")):
            if base.startswith(prefix) and key not in out:
                out[key] = body
    if "Image" not in out:
        raise BuildError(f"the Debian kernel package {version_hint} has no /boot/vmlinux or vmlinuz")
    img = out["Image"]
    # The RISC-V Image header (Documentation/arch/riscv/boot-image-header.rst):
    # magic2 "RSC\x05" at 0x38.  A gzip'd vmlinuz would start with 1f 8b.
    if img[:2] == b"\x1f\x8b":
        try:
            img = out["Image"] = gzip.decompress(img)
        except (OSError, EOFError, zlib.error) as e:
            raise BuildError(f"the Debian kernel {version_hint} does not decompress: {e}") from None
    if len(img) < 0x40 or img[0x38:0x3C] != b"RSC\x05":
        raise BuildError(f"the Debian kernel {version_hint} is not a RISC-V Image")
    return out


def build_debian_kernel(progress: Progress | None = None) -> Path:
    """The cached Image of Debian's current stock riscv64 kernel, fetched if missing."""
    from pyvirt.images.debian import DebFile, DebianArchive

    progress = progress or Progress()
    archive = DebianArchive(SUITE, ARCH, progress=progress)
    meta = archive.package(METAPACKAGE)
    pkg = archive.package(image_package_name(meta.depends))
    final = kernel_dir(pkg.sha256)
    if (final / "Image").is_file():
        return final / "Image"
    with cache.lock(final.name):
        if (final / "Image").is_file():
            return final / "Image"
        progress.step(f"fetching {pkg.name} {pkg.version} ({ARCH}, {pkg.size >> 20} MiB)")
        deb = DebFile(archive.download_package(pkg))
        boot = {n: deb.read(n) for n in deb.names() if n.startswith("boot/") and not n.endswith("/")}
        files = extract_kernel(boot, f"{pkg.name} {pkg.version}")
        with cache.building(final) as out:
            for name, body in files.items():
                (out / name).write_bytes(body)
            manifest = {"version": DEBIAN_KERNEL_VERSION, "package": pkg.name,
                        "package_version": pkg.version, "package_sha256": pkg.sha256,
                        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        progress.note(f"Debian kernel {pkg.version}: {final / 'Image'}")
    return final / "Image"
