"""Kernel modules read on the host: .modinfo parsing and load order."""

from __future__ import annotations

import lzma
import struct

import pytest

from pyvirt.errors import BuildError
from pyvirt.images.kmodules import ModuleSet, decompress_module, module_name, parse_module, read_modinfo
from pyvirt.testing.images import fake_module


def test_modinfo_pairs_are_read() -> None:
    elf = fake_module([("license", "GPL"), ("depends", "jbd2,mbcache"), ("softdep", "pre: crc32c"),
                       ("name", "ext4"), ("alias", "fs-ext4")])
    assert read_modinfo(elf) == [("license", "GPL"), ("depends", "jbd2,mbcache"), ("softdep", "pre: crc32c"),
                                 ("name", "ext4"), ("alias", "fs-ext4")]
    m = parse_module("kernel/fs/ext4/ext4.ko", elf)
    assert (m.name, m.depends, m.softdeps, m.aliases) == ("ext4", ["jbd2", "mbcache"], ["crc32c"], ["fs-ext4"])


def test_softdep_keeps_only_pre_modules() -> None:
    m = parse_module("x.ko", fake_module([("softdep", "pre: a b post: c")]))
    assert m.softdeps == ["a", "b"]


def test_names_and_compression() -> None:
    assert module_name("kernel/drivers/virtio/virtio-mmio.ko.xz") == "virtio_mmio"
    elf = fake_module({"name": ["virtio_mmio"]})
    assert decompress_module("a.ko.xz", lzma.compress(elf, format=lzma.FORMAT_XZ)) == elf
    assert decompress_module("a.ko", elf) == elf
    with pytest.raises(BuildError, match="does not decompress"):
        decompress_module("a.ko.xz", b"not xz at all")


@pytest.mark.parametrize("damage", ["short", "magic", "shoff", "shstrndx"])
def test_damaged_modules_give_clean_errors(damage: str) -> None:
    elf = bytearray(fake_module({"name": ["m"]}))
    if damage == "short":
        elf = elf[:40]
    elif damage == "magic":
        elf[0] = 0
    elif damage == "shoff":
        struct.pack_into("<Q", elf, 0x28, len(elf) - 10)
    else:
        struct.pack_into("<H", elf, 0x3E, 9)
    with pytest.raises(BuildError):
        read_modinfo(bytes(elf), "m.ko")


def test_module_without_modinfo_is_refused() -> None:
    elf = bytearray(fake_module({"name": ["m"]}))
    i = elf.index(b".modinfo")
    elf[i:i + 8] = b".nothing"
    with pytest.raises(BuildError, match="no .modinfo"):
        read_modinfo(bytes(elf), "m.ko")


def _set(mods: dict[str, list[tuple[str, str]]], builtin: tuple[str, ...] = ()) -> ModuleSet:
    return ModuleSet.from_files({f"kernel/{n}.ko": fake_module(info) for n, info in mods.items()}, builtin)


def test_load_order_puts_dependencies_first() -> None:
    mods = _set({
        "virtio_mmio": [("name", "virtio_mmio")],
        "virtio_blk": [("name", "virtio_blk")],
        "ext4": [("name", "ext4"), ("depends", "mbcache,jbd2,crc16"), ("softdep", "pre: crc32c")],
        "jbd2": [("name", "jbd2"), ("depends", "")],
        "mbcache": [("name", "mbcache")],
        "crc16": [("name", "crc16")],
        "crc32c_generic": [("name", "crc32c_generic"), ("alias", "crc32c"), ("alias", "crypto-crc32c")],
        "unrelated": [("name", "unrelated")],
    })
    order = [m.name for m in mods.load_order(["virtio_mmio", "virtio_blk", "ext4"])]
    assert order == ["virtio_mmio", "virtio_blk", "crc32c_generic", "mbcache", "jbd2", "crc16", "ext4"]
    for i, name in enumerate(order):         # every module after what it needs
        for dep in mods.modules[name].depends:
            assert order.index(dep) < i


def test_builtin_and_missing_dependencies() -> None:
    mods = _set({"a": [("name", "a"), ("depends", "b")], "c": [("name", "c"), ("depends", "nowhere")],
                 "d": [("name", "d"), ("softdep", "pre: missing-soft")]}, builtin=("kernel/lib/b.ko",))
    assert [m.name for m in mods.load_order(["a"])] == ["a"]
    assert [m.name for m in mods.load_order(["d"])] == ["d"]       # a soft dependency is optional
    with pytest.raises(BuildError, match="nowhere"):
        mods.load_order(["c"])


def test_dependency_cycles_are_reported() -> None:
    mods = _set({"a": [("name", "a"), ("depends", "b")], "b": [("name", "b"), ("depends", "a")]})
    with pytest.raises(BuildError, match="cycle"):
        mods.load_order(["a"])
