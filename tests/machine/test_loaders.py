"""Kernel, firmware and initrd loading: real images load, bad ones give one clear error."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvirt.errors import ImageError
from pyvirt.machine import boot
from pyvirt.machine.elf import parse_elf
from pyvirt.memory import Bus

RAM = 0x8000_0000


def _image(text_offset: int = 0x200000, size: int = 0x1000, payload: bytes = b"\x13\x00\x00\x00") -> bytes:
    hdr = bytearray(64)
    struct.pack_into("<IIQQ", hdr, 0, 0x0000006F, 0, text_offset, size)   # j . ; text_offset; image_size
    hdr[48:56] = b"RISCV\0\0\0"
    hdr[56:60] = b"RSC\x05"
    return bytes(hdr) + payload


def _elf(vaddr: int, paddr: int, data: bytes, entry: int, machine: int = 243) -> bytes:
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, machine, 1,
                       entry, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 64 + 56, vaddr, paddr, len(data), len(data) + 16, 0x1000)
    return ehdr + phdr + data


def test_image_loads_at_text_offset(tmp_path: Path) -> None:
    bus = Bus(RAM, 16 << 20)
    k = tmp_path / "Image"
    k.write_bytes(_image())
    loaded = boot.load_kernel(bus, k)
    assert loaded.entry == RAM + 0x200000
    assert bus.read_bytes(loaded.entry + 56, 4) == b"RSC\x05"
    assert loaded.end == loaded.start + 0x1000


def test_elf_vmlinux_is_relocated_into_ram(tmp_path: Path) -> None:
    bus = Bus(RAM, 16 << 20)
    k = tmp_path / "vmlinux"
    k.write_bytes(_elf(0xFFFF_FFFF_8000_0000, 0xFFFF_FFFF_8000_0000, b"\xaa" * 32, 0xFFFF_FFFF_8000_0010))
    loaded = boot.load_kernel(bus, k)
    assert loaded.entry == RAM + 0x200000 + 0x10
    assert bus.read_bytes(RAM + 0x200000, 32) == b"\xaa" * 32
    assert bus.read_bytes(RAM + 0x200000 + 32, 16) == bytes(16)    # bss cleared


@pytest.mark.parametrize("content, message", [
    (b"", "not a RISC-V Linux Image"),
    (b"hello world" * 10, "not a RISC-V Linux Image"),
    (b"\x7fELF" + bytes(100), "64-bit little-endian"),
])
def test_not_a_kernel(tmp_path: Path, content: bytes, message: str) -> None:
    k = tmp_path / "k"
    k.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        boot.load_kernel(Bus(RAM, 16 << 20), k)


def test_foreign_elf_is_refused(tmp_path: Path) -> None:
    k = tmp_path / "x86"
    k.write_bytes(_elf(0x1000, 0x1000, b"\x90", 0x1000, machine=62))
    with pytest.raises(ImageError, match="another architecture"):
        boot.load_kernel(Bus(RAM, 16 << 20), k)


def test_missing_kernel(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        boot.load_kernel(Bus(RAM, 16 << 20), tmp_path / "nope")


def test_kernel_larger_than_ram(tmp_path: Path) -> None:
    k = tmp_path / "Image"
    k.write_bytes(_image(size=64 << 20))
    with pytest.raises(ImageError, match="does not fit"):
        boot.load_kernel(Bus(RAM, 16 << 20), k)


def test_initrd_that_does_not_fit_is_refused() -> None:
    bus = Bus(RAM, 16 << 20)
    with pytest.raises(ImageError, match="does not fit"):
        boot.place_top(bus, bytes(15 << 20), bus.ram_end, RAM + (2 << 20), 4096, "initrd")


def test_firmware_must_be_linked_in_ram(tmp_path: Path) -> None:
    fw = tmp_path / "fw.elf"
    fw.write_bytes(_elf(0x1000, 0x1000, b"\x13\0\0\0", 0x1000))
    with pytest.raises(ImageError, match="not linked to run from guest RAM"):
        boot.load_firmware(Bus(RAM, 16 << 20), fw)


def test_corrupt_program_headers(tmp_path: Path) -> None:
    data = bytearray(_elf(RAM, RAM, b"\0" * 8, RAM))
    struct.pack_into("<Q", data, 32, 1 << 40)        # e_phoff far beyond the file
    with pytest.raises(ImageError, match="corrupt"):
        parse_elf(bytes(data))


@pytest.mark.parametrize("what", ["kernel", "firmware", "initrd"])
def test_a_device_or_fifo_is_refused_without_reading_it(tmp_path: Path, what: str) -> None:
    """/dev/zero as a kernel was read until the host ran out of memory, and a FIFO waited for a
    writer forever: only regular files are read, and none larger than guest RAM."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        with pytest.raises(ImageError, match=f"^{what} .* is not a regular file$"):
            if what == "kernel":
                boot.load_kernel(Bus(RAM, 16 << 20), path)
            elif what == "firmware":
                boot.load_firmware(Bus(RAM, 16 << 20), path)
            else:
                boot.read_file(path, what, 16 << 20)


def test_a_file_larger_than_ram_is_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate((16 << 20) + 1)                      # (sparse: nothing is read to refuse it)
    with pytest.raises(ImageError, match=r"^initrd .* does not fit in guest RAM \(16 MiB\)$"):
        boot.read_file(big, "initrd", 16 << 20)
    assert len(boot.read_file(big, "initrd", 32 << 20)) == (16 << 20) + 1
