"""The device tree writer: every tree size serialises and reads back."""

from __future__ import annotations

import libfdt

from pyvirt.machine.fdt import U64, Node, to_dtb


def test_every_command_line_length_serialises_and_reads_back() -> None:
    # pylibfdt's sequential writer fails its last step when a tree just fills its buffer
    # (a 1,911-byte command line did): lengths around several buffer sizes.
    for n in range(0, 9000, 3):
        root = Node("", {"model": "pyvirt", "#address-cells": 2},
                    [Node("chosen", {"bootargs": "a" * n}), Node("memory@80000000", {"reg": U64(1)})])
        fdt = libfdt.Fdt(to_dtb(root))
        assert fdt.getprop(fdt.path_offset("/chosen"), "bootargs").as_str() == "a" * n
