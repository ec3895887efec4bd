"""Device tree construction (Devicetree Specification v0.4) through pylibfdt.

The board describes itself as a tree of `Node`s; `to_dtb()` serialises it
with libfdt's sequential-write API.  Property values: an int is one 32-bit
cell, a list of ints is a cell array, `U64(v)` is one 64-bit value, a str is
a string, a list of str a string list, bytes are raw.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

import libfdt

MAX_DTB = 1 << 20          # bytes: far beyond any board's tree


@dataclass(frozen=True)
class U64:
    value: int


Value = Union[int, list[int], U64, str, list[str], bytes, None]   # evaluated at run time: 3.9 lacks X | Y


@dataclass
class Node:
    name: str
    props: dict[str, Value] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def add(self, child: Node) -> Node:
        self.children.append(child)
        return child

    def find(self, path: str) -> Node | None:
        node: Node | None = self
        for part in filter(None, path.split("/")):
            node = next((c for c in node.children if c.name == part), None) if node else None
        return node


def _encode(value: Value) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, U64):
        return struct.pack(">Q", value.value)
    if isinstance(value, bool):
        raise TypeError("use None for an empty property")
    if isinstance(value, int):
        return struct.pack(">I", value)
    if isinstance(value, str):
        return value.encode() + b"\0"
    if all(isinstance(v, str) for v in value):
        return b"".join(v.encode() + b"\0" for v in value)  # type: ignore[union-attr]
    return b"".join(struct.pack(">I", v) for v in value)  # type: ignore[arg-type]


def reg(*pairs: tuple[int, int]) -> bytes:
    """A `reg` value for #address-cells = #size-cells = 2."""
    return b"".join(struct.pack(">QQ", a, s) for a, s in pairs)


def _emit(sw: libfdt.FdtSw, node: Node) -> None:
    sw.begin_node(node.name)
    for name, value in node.props.items():
        sw.property(name, _encode(value))
    for child in node.children:
        _emit(sw, child)
    sw.end_node()


def to_dtb(root: Node, boot_cpuid: int = 0) -> bytes:
    size = 4096
    while True:
        sw = libfdt.FdtSw(size)
        sw.finish_reservemap()
        _emit(sw, root)
        try:
            fdt = sw.as_fdt()
        except libfdt.FdtException as e:
            # pylibfdt grows the buffer as properties go in, but not for fdt_finish's last
            # step: a tree that just fills it fails there (a long --command with --image debian
            # did; a bare tree with a 1,911-byte command line does).  Start again with room to spare.
            if e.err != -libfdt.NOSPACE or size >= MAX_DTB:
                raise
            size *= 2
            continue
        fdt.pack()
        return bytes(fdt.as_bytearray())
