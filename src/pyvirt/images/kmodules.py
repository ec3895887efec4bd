"""Linux kernel modules read on the host: .modinfo, dependencies, load order.

An initramfs that mounts the root disk of a distribution kernel needs the
modules for it (virtio-mmio, virtio-blk, ext4 and what they pull in), loaded
in dependency order by busybox `insmod`, which knows nothing of modules.dep.
The kernel records each module's needs in its ELF `.modinfo` section as
NUL-separated `key=value` strings: `name=`, `depends=` (modules whose symbols
it uses), `softdep=pre: ...` (modules it asks for by name at run time, such
as ext4's crc32c) and `alias=` (other names it answers to).

    mods = ModuleSet.from_files({path: bytes, ...})     # .ko, .ko.xz, .ko.zst
    order = mods.load_order(["virtio_mmio", "virtio_blk", "ext4"])
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pyvirt.errors import BuildError

_ELF64_LE = b"\x7fELF\x02\x01"


def decompress_module(path: str, data: bytes) -> bytes:
    """The plain ELF of a module file (.ko, .ko.xz, .ko.zst)."""
    try:
        if path.endswith(".xz"):
            return lzma.decompress(data)
        if path.endswith(".zst"):
            import zstandard
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except (lzma.LZMAError, ValueError, ImportError) as e:
        raise BuildError(f"kernel module {path} does not decompress: {e}") from None
    return data


def module_name(path: str) -> str:
    """The kernel's name for a module file: basename without .ko[.xz], '-' as '_'."""
    base = path.rsplit("/", 1)[-1]
    base = base.split(".ko", 1)[0]
    return base.replace("-", "_")


def read_modinfo(elf: bytes, what: str = "module") -> list[tuple[str, str]]:
    """The (key, value) pairs of a 64-bit little-endian ELF module's .modinfo section."""
    if len(elf) < 64 or not elf.startswith(_ELF64_LE):
        raise BuildError(f"{what} is not a 64-bit little-endian ELF module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shentsize != 64 or shstrndx >= shnum or shoff + shnum * 64 > len(elf):
        raise BuildError(f"{what} has a damaged section table")

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * 64)
        if off + size > len(elf):
            raise BuildError(f"{what}: section {i} lies outside the file")
        return name, off, size

    _, stroff, strsize = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if name >= strsize:
            continue
        end = elf.find(b"\0", stroff + name, stroff + strsize)
        if elf[stroff + name:end] == b".modinfo":
            pairs = []
            for item in elf[off:off + size].split(b"\0"):
                key, eq, value = item.partition(b"=")
                if eq:
                    pairs.append((key.decode("ascii", "replace"), value.decode("ascii", "replace")))
            return pairs
    raise BuildError(f"{what} has no .modinfo section")


@dataclass
class Module:
    name: str
    path: str                       # where it lies in the kernel package
    elf: bytes                      # decompressed
    depends: list[str] = field(default_factory=list)
    softdeps: list[str] = field(default_factory=list)      # "pre:" soft dependencies
    aliases: list[str] = field(default_factory=list)


def parse_module(path: str, data: bytes) -> Module:
    elf = decompress_module(path, data)
    info = read_modinfo(elf, path)
    mod = Module(module_name(path), path, elf)
    for key, value in info:
        if key == "name" and value:
            mod.name = value
        elif key == "depends":
            mod.depends += [d for d in value.split(",") if d]
        elif key == "softdep":
            # "pre: a b post: c" -- only what must be there first matters here.
            words, pre = value.split(), False
            for w in words:
                if w.endswith(":"):
                    pre = w == "pre:"
                elif pre:
                    mod.softdeps.append(w)
        elif key == "alias":
            mod.aliases.append(value)
    return mod


class ModuleSet:
    """Modules by name and alias, able to order a set of them for loading."""

    def __init__(self, modules: Iterable[Module], builtin: Iterable[str] = ()) -> None:
        self.modules: dict[str, Module] = {}
        self.aliases: dict[str, str] = {}
        self.builtin = {module_name(b) for b in builtin}
        for m in modules:
            self.modules[m.name] = m
        for m in self.modules.values():
            for a in m.aliases:
                self.aliases.setdefault(a.replace("-", "_"), m.name)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], builtin: Iterable[str] = ()) -> ModuleSet:
        return cls((parse_module(p, d) for p, d in files.items()), builtin)

    def resolve(self, name: str) -> str | None:
        """The module providing `name` (a module name or alias); None when built in."""
        n = name.replace("-", "_")
        if n in self.modules:
            return n
        if n in self.aliases:
            return self.aliases[n]
        if n in self.builtin:
            return None
        raise BuildError(f"no kernel module named {name!r} (and it is not built in)")

    def load_order(self, wanted: Iterable[str]) -> list[Module]:
        """`wanted` and everything they need, each after what it needs."""
        order: list[Module] = []
        state: dict[str, int] = {}          # 1 visiting, 2 done

        def visit(name: str, chain: tuple[str, ...], soft: bool = False) -> None:
            try:
                resolved = self.resolve(name)
            except BuildError:
                if soft:        # a soft dependency is a wish: the kernel copes without it
                    return
                raise
            if resolved is None or state.get(resolved) == 2:
                return
            if state.get(resolved) == 1:
                raise BuildError(f"kernel modules depend on each other in a cycle: {' -> '.join(chain)}")
            state[resolved] = 1
            mod = self.modules[resolved]
            for dep in mod.softdeps:
                visit(dep, chain + (dep,), soft=True)
            for dep in mod.depends:
                visit(dep, chain + (dep,))
            state[resolved] = 2
            order.append(mod)

        for w in wanted:
            visit(w, (w,))
        return order
