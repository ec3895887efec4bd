"""User errors end with one clear line and a non-zero status; guest faults never reach the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import pyvirt


def one_line_error(r, pattern: str) -> None:
    assert r.code != 0
    assert "Traceback" not in r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert pattern in lines[0], lines[0]


def test_missing_kernel(tmp_path: Path) -> None:
    one_line_error(pyvirt("run", "--kernel", str(tmp_path / "nope")), "does not exist")


def test_not_a_kernel(tmp_path: Path) -> None:
    k = tmp_path / "notes.txt"
    k.write_text("not a kernel at all\n" * 10)
    one_line_error(pyvirt("run", "--kernel", str(k)), "not a RISC-V Linux Image")


def test_initrd_larger_than_ram(default_image, tmp_path: Path) -> None:
    big = tmp_path / "big.cpio"
    with open(big, "wb") as f:
        f.truncate(40 << 20)
    one_line_error(pyvirt("run", "--kernel", str(default_image.kernel), "--initrd", str(big),
                          "--memory", "32M"), "does not fit")


def test_unknown_flag() -> None:
    one_line_error(pyvirt("run", "--frobnicate"), "unrecognized arguments: --frobnicate")


def test_missing_disk(default_image, tmp_path: Path) -> None:
    one_line_error(pyvirt("run", "--disk", str(tmp_path / "absent.img"), "--command", "true"),
                   "does not exist")


@pytest.mark.parametrize("cpus", ["0", "9"])
def test_bad_cpu_count(cpus: str) -> None:
    one_line_error(pyvirt("run", "--cpus", cpus), "invalid cpus")
