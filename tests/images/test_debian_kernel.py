"""Finding and unpacking Debian's stock riscv64 kernel (no network: package contents are made here)."""

from __future__ import annotations

import gzip

import pytest

from pyvirt.errors import BuildError
from pyvirt.images.debian_kernel import extract_kernel, image_package_name


def _image(size: int = 0x1000) -> bytes:
    img = bytearray(size)
    img[0:2] = b"MZ"                      # the EFI stub's PE/COFF header comes first
    img[0x30:0x38] = b"RISCV\0\0\0"
    img[0x38:0x3C] = b"RSC\x05"
    return bytes(img)


def test_image_package_from_metapackage_depends() -> None:
    assert image_package_name("linux-image-6.12.117+deb13-riscv64 (= 6.12.117-1)") == \
        "linux-image-6.12.117+deb13-riscv64"
    assert image_package_name("foo, linux-image-6.1.0-9-riscv64") == "linux-image-6.1.0-9-riscv64"
    with pytest.raises(BuildError, match="depends on no linux-image"):
        image_package_name("linux-image-riscv64-signed-template")


def test_extract_plain_and_gzipped_images() -> None:
    files = {"boot/vmlinux-6.12-riscv64": _image(), "boot/config-6.12-riscv64": b"CONFIG_X=y\n",
             "boot/System.map-6.12-riscv64": b"ffffffff80000000 T _start\n"}
    out = extract_kernel(files)
    assert out == {"Image": _image(), "config": b"CONFIG_X=y\n", "System.map": b"ffffffff80000000 T _start\n"}
    out = extract_kernel({"boot/vmlinuz-6.12-riscv64": gzip.compress(_image())})
    assert out["Image"] == _image()


@pytest.mark.parametrize("files, message", [
    ({"boot/config-6.12": b""}, "no /boot/vmlinux"),
    ({"boot/vmlinux-6.12": b"\x7fELF" + bytes(100)}, "not a RISC-V Image"),
    ({"boot/vmlinuz-6.12": b"\x1f\x8b" + bytes(30)}, "does not decompress"),
])
def test_bad_packages_are_clear_errors(files: dict[str, bytes], message: str) -> None:
    with pytest.raises(BuildError, match=message):
        extract_kernel(files, "linux-image-x")
