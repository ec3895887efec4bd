"""Guest images: the default guest (lean kernel + busybox initramfs), built and cached.

    img = default_image()            # builds what is missing (minutes the first time)
    img.kernel, img.initrd, img.cmdline
    cached_default_image()           # the same from the cache only, or None

The kernel is built from Debian's linux-source-6.1 with pyvirt's config
fragment (images/kernel.py); the initramfs holds Debian trixie's
busybox-static for riscv64, fetched and verified through the signed archive
(images/debian.py), and pyvirt's own /init (images/initramfs.py,
data/init).  Everything lives under ~/.cache/pyvirt (see images/cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyvirt.errors import BuildError
from pyvirt.images.initramfs import build_initramfs, cached_initramfs
from pyvirt.images.kernel import build_kernel, cached_kernel
from pyvirt.images.progress import make_progress

# The SBI earlycon shows the first boot messages before the UART driver binds.
DEFAULT_CMDLINE = "console=ttyS0 earlycon=sbi"

__all__ = ["DEFAULT_CMDLINE", "DefaultImage", "cached_default_image", "default_image"]


@dataclass(frozen=True)
class DefaultImage:
    kernel: Path                # uncompressed riscv64 Image
    initrd: Path                # uncompressed newc cpio
    cmdline: str = DEFAULT_CMDLINE


def cached_default_image() -> DefaultImage | None:
    """The default guest from the cache, built from the current inputs; None if not built (no network)."""
    kernel = cached_kernel()
    initrd = cached_initramfs()
    if kernel is None or initrd is None:
        return None
    return DefaultImage(kernel, initrd)


def default_image(build: bool = True, progress: bool = True) -> DefaultImage:
    """The default guest, from the cache or built now.

    `progress`: a live display when stderr is a terminal; False (or not a
    terminal) gives plain one-line status messages on stderr instead.
    Raises BuildError (one line; build logs are kept and named) on failure,
    or when the image is not built and `build` is False.
    """
    found = cached_default_image()
    if found is not None:
        return found
    if not build:
        raise BuildError("the default image is not built: run `pyvirt image build`")
    with make_progress(progress) as reporter:
        initrd = cached_initramfs() or build_initramfs(reporter)
        kernel = build_kernel(reporter)
    return DefaultImage(kernel, initrd)
