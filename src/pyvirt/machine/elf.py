"""A small reader for 64-bit little-endian RISC-V ELF files (the parts a loader needs).

ELF-64 Object File Format 1.5 and the RISC-V ELF psABI: file header,
program headers (PT_LOAD segments) and the symbol table (for `tohost`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyvirt.errors import ImageError

EM_RISCV = 243
PT_LOAD = 1
SHT_SYMTAB = 2

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")


@dataclass
class Segment:
    vaddr: int
    paddr: int
    data: bytes
    memsz: int


@dataclass
class ElfImage:
    entry: int
    segments: list[Segment]
    symbols: dict[str, int] = field(default_factory=dict)

    @property
    def low_vaddr(self) -> int:
        return min(s.vaddr for s in self.segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def parse_elf(data: bytes, what: str = "file") -> ElfImage:
    """Parse `data`; raise ImageError with a one-line reason if it is not a loadable RV64 ELF."""
    if len(data) < _EHDR.size or not is_elf(data):
        raise ImageError(f"{what} is not an ELF file")
    (ident, e_type, machine, _ver, entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, shnum, _shstrndx) = _EHDR.unpack_from(data, 0)
    if ident[4] != 2 or ident[5] != 1:
        raise ImageError(f"{what} is not a 64-bit little-endian ELF file")
    if machine != EM_RISCV:
        raise ImageError(f"{what} is an ELF file for another architecture (e_machine={machine})")
    if phentsize != _PHDR.size or phoff + phnum * phentsize > len(data):
        raise ImageError(f"{what} has a corrupt program header table")
    segments = []
    for i in range(phnum):
        p_type, _pf, off, vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(data, phoff + i * phentsize)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or off + filesz > len(data):
            raise ImageError(f"{what} has a corrupt PT_LOAD segment")
        segments.append(Segment(vaddr, paddr, data[off:off + filesz], memsz))
    if not segments:
        raise ImageError(f"{what} has no loadable segments")
    symbols: dict[str, int] = {}
    if shoff and shentsize == _SHDR.size and shoff + shnum * shentsize <= len(data):
        sections = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
        for sh in sections:
            if sh[1] != SHT_SYMTAB or sh[6] >= len(sections):
                continue
            strtab = sections[sh[6]]
            str_off, str_size = strtab[4], strtab[5]
            sym_off, sym_size = sh[4], sh[5]
            if sym_off + sym_size > len(data) or str_off + str_size > len(data):
                continue
            for j in range(sym_size // _SYM.size):
                name_off, _info, _other, shndx, value, _size = _SYM.unpack_from(data, sym_off + j * _SYM.size)
                if not name_off or name_off >= str_size or shndx == 0:
                    continue
                end = data.find(b"\0", str_off + name_off, str_off + str_size)
                if end < 0:
                    continue
                name = data[str_off + name_off:end].decode("ascii", "replace")
                symbols.setdefault(name, value)
    return ElfImage(entry, segments, symbols)
