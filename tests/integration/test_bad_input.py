"""User errors end with one clear line and a non-zero status; guest faults never reach the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirt.testing.guest import pyvirt


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
    one_line_error(pyvirt("run", "--cpus", cpus), f"--cpus {cpus}: at {'least 1' if cpus == '0' else 'most 8'}")


def test_qcow2_disk_errors(default_image, tmp_path: Path) -> None:
    from pyvirt.backends.qcow2 import Qcow2Backend
    from pyvirt.backends.qcow2_tools import create_qcow2

    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    top = tmp_path / "top.qcow2"
    create_qcow2(top, None, backing=base)
    base.unlink()
    before = top.read_bytes()
    one_line_error(pyvirt("run", "--disk", str(top), "--command", "true"), "base.raw does not exist")
    bad = tmp_path / "bad.qcow2"
    create_qcow2(bad, 1 << 20)
    with open(bad, "r+b") as f:
        f.seek(40)
        f.write((12345).to_bytes(8, "big"))         # the L1 table, misaligned
    one_line_error(pyvirt("run", "--disk", f"{bad},ro", "--command", "true"), "not cluster-aligned")
    busy = tmp_path / "busy.qcow2"
    create_qcow2(busy, 1 << 20)
    held = Qcow2Backend(busy)                         # another VM has it
    try:
        one_line_error(pyvirt("run", "--disk", str(busy), "--command", "true"), "in use by another VM")
    finally:
        held.close()
    one_line_error(pyvirt("run", "--disk", f"{bad},format=vmdk", "--command", "true"),
                   "unknown disk option 'format=vmdk'")
    assert top.read_bytes() == before


def test_debian_image_flag_conflicts(tmp_path: Path) -> None:
    one_line_error(pyvirt("run", "--root-disk", str(tmp_path / "r.qcow2")), "--root-disk goes with --image debian")
    one_line_error(pyvirt("run", "--image", "debian", "--kernel", str(tmp_path / "k")),
                   "--image debian brings its own kernel")
    assert not (tmp_path / "r.qcow2").exists()
