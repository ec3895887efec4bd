"""Loading what the guest boots: a Linux kernel, an initrd, firmware, the device tree.

RISC-V Linux boot protocol (Documentation/riscv/boot.rst and
boot-image-header.rst): the kernel `Image` starts with a 64-byte header
(magic "RSC\\x05" at offset 56, text_offset at 8, image_size at 16), is
loaded 2 MiB-aligned in RAM and entered in S-mode with a0 = hart id and
a1 = physical address of the device tree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from pyvirt.errors import ImageError
from pyvirt.fsutil import FileTooLarge, NotRegularFile, read_regular
from pyvirt.machine.elf import ElfImage, is_elf, parse_elf
from pyvirt.memory import Bus

IMAGE_MAGIC2 = b"RSC\x05"
IMAGE_MAGIC_OLD = b"RISCV\0\0\0"
KERNEL_OFFSET = 0x200000
MIB = 1 << 20


@dataclass
class Loaded:
    entry: int
    start: int
    end: int


def read_file(path: str | Path, what: str, limit: int) -> bytes:
    """The whole of a regular file of at most `limit` bytes (guest RAM: nothing larger can be
    placed), in one line's error otherwise: /dev/zero as a kernel would be read until the host
    ran out of memory, a FIFO would wait for a writer (fsutil.read_regular)."""
    p = Path(path)
    try:
        return read_regular(p, limit)
    except FileNotFoundError:
        raise ImageError(f"{what} {p} does not exist") from None
    except NotRegularFile as e:
        raise ImageError(f"{what} {p} is {e.strerror}") from None
    except FileTooLarge:
        raise ImageError(f"{what} {p} does not fit in guest RAM ({limit // MIB} MiB)") from None
    except OSError as e:
        raise ImageError(f"cannot read {what} {p}: {e.strerror}") from None


def _place(bus: Bus, addr: int, data: bytes, memsz: int, what: str) -> None:
    if not bus.is_ram(addr, max(memsz, len(data))):
        raise ImageError(f"{what} ({memsz / MIB:.1f} MiB at {addr:#x}) does not fit in guest RAM "
                         f"({bus.ram_size // MIB} MiB at {bus.ram_base:#x})")
    bus.write_bytes(addr, data)
    if memsz > len(data):
        bus.write_bytes(addr + len(data), bytes(memsz - len(data)))


def _load_elf(bus: Bus, image: ElfImage, base: int, what: str) -> Loaded:
    in_ram = all(bus.is_ram(s.paddr, s.memsz) for s in image.segments)
    low = min(s.paddr if in_ram else s.vaddr for s in image.segments)
    start, end = None, 0
    for s in image.segments:
        addr = s.paddr if in_ram else base + (s.vaddr - low)
        _place(bus, addr, s.data, s.memsz, what)
        start = addr if start is None else min(start, addr)
        end = max(end, addr + s.memsz)
    entry = image.entry
    if not in_ram:
        entry = base + (image.entry - image.low_vaddr)
    assert start is not None
    return Loaded(entry, start, end)


def load_kernel(bus: Bus, path: str | Path) -> Loaded:
    """Load a Linux `Image` or ELF `vmlinux` 2 MiB above the start of RAM."""
    data = read_file(path, "kernel", bus.ram_size)
    base = bus.ram_base + KERNEL_OFFSET
    if is_elf(data):
        return _load_elf(bus, parse_elf(data, f"kernel {path}"), base, "kernel")
    if len(data) < 64 or (data[56:60] != IMAGE_MAGIC2 and data[48:56] != IMAGE_MAGIC_OLD):
        raise ImageError(f"kernel {path} is not a RISC-V Linux Image or ELF file")
    text_offset, image_size = struct.unpack_from("<QQ", data, 8)
    addr = bus.ram_base + (text_offset or KERNEL_OFFSET)
    size = max(image_size, len(data))
    _place(bus, addr, data, size, "kernel")
    return Loaded(addr, addr, addr + size)


def load_firmware(bus: Bus, path: str | Path) -> tuple[Loaded, dict[str, int]]:
    """Load an M-mode ELF (bare-metal program, OpenSBI) at its physical addresses."""
    data = read_file(path, "firmware", bus.ram_size)
    image = parse_elf(data, f"firmware {path}")
    if not all(bus.is_ram(s.paddr, s.memsz) for s in image.segments):
        raise ImageError(f"firmware {path} is not linked to run from guest RAM at {bus.ram_base:#x}")
    return _load_elf(bus, image, bus.ram_base, "firmware"), image.symbols


def place_top(bus: Bus, data: bytes, below: int, floor: int, align: int, what: str) -> int:
    """Put `data` as high as possible under `below`, aligned; it must stay above `floor`."""
    addr = (below - len(data)) & ~(align - 1)
    if addr < floor:
        raise ImageError(f"{what} ({len(data) / MIB:.1f} MiB) does not fit in guest RAM "
                         f"({bus.ram_size // MIB} MiB) next to the kernel")
    bus.write_bytes(addr, data)
    return addr
