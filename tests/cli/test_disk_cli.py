"""`pyvirt disk create` and `pyvirt disk info`: what they make, what they print, how they fail."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from pyvirt.backends.qcow2 import Qcow2Backend
from pyvirt.testing import qemu_img as q
from pyvirt.testing.cli import one_line_error, run

needs_qemu = pytest.mark.skipif(q.QEMU_IMG is None, reason="needs qemu-img (Debian: qemu-utils)")


@needs_qemu
def test_create_and_info(tmp_path: Path, capsys) -> None:
    img = tmp_path / "vm.qcow2"
    assert run(capsys, "disk", "create", str(img), "--size", "8G")[0] == 0
    info = q.info(img)
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == ("qcow2", 8 << 30, 65536)
    assert img.stat().st_size < 1 << 20
    code, out, err = run(capsys, "disk", "info", str(img))
    assert code == 0 and not err
    assert "format: qcow2 (version 3)" in out
    assert "virtual size: 8 GiB (8589934592 bytes)" in out
    assert "cluster size: 65536" in out
    assert "check: no errors, no leaks" in out


@needs_qemu
def test_create_over_a_backing_file(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("base.raw").write_bytes(b"\x42" * (3 << 20))
    assert run(capsys, "disk", "create", "top.qcow2", "--backing", "base.raw", "--cluster-size", "4096")[0] == 0
    info = q.info(tmp_path / "top.qcow2")
    assert info["backing-filename"] == "base.raw" and info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 3 << 20 and info["cluster-size"] == 4096
    code, out, _ = run(capsys, "disk", "info", "top.qcow2")
    assert code == 0 and "backing file: base.raw (format: raw)" in out
    Path("base.raw").unlink()
    code, out, _ = run(capsys, "disk", "info", "top.qcow2")       # still described
    assert code == 0 and "backing file: base.raw (format: raw, missing)" in out


def test_info_on_a_raw_image(tmp_path: Path, capsys) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    code, out, _ = run(capsys, "disk", "info", str(img))
    assert code == 0 and "format: raw" in out and "virtual size: 1 MiB (1048576 bytes)" in out


def test_info_reports_leaks_and_errors(tmp_path: Path, capsys) -> None:
    img = tmp_path / "x.qcow2"
    assert run(capsys, "disk", "create", str(img), "--size", "1M")[0] == 0
    with open(img, "r+b") as f:                      # a refcount for cluster 9, used by nothing
        f.seek(0x20000 + 18)
        f.write(struct.pack(">H", 1))
    code, out, _ = run(capsys, "disk", "info", str(img))
    assert code == 0 and "check: no errors, 1 leaked clusters" in out
    with open(img, "r+b") as f:                      # refcount 0 for the header cluster
        f.seek(0x20000)
        f.write(struct.pack(">H", 0))
    code, out, _ = run(capsys, "disk", "info", str(img))
    assert code == 3 and "check: 1 errors" in out


@pytest.mark.parametrize("args, message", [
    (["--size", "100000T"], "too large"),
    (["--size", "lots"], "--size lots: expected a size"),
    (["--size", "1M", "--cluster-size", "1000"], "cluster size 1000 is not a power of two"),
    (["--size", "1M", "--cluster-size", "4M"], "cluster size"),
    ([], "needs a size"),
    (["--backing", "absent.qcow2"], "absent.qcow2 does not exist"),
])
def test_create_errors_write_nothing(tmp_path: Path, capsys, monkeypatch, args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    one_line_error(run(capsys, "disk", "create", "new.qcow2", *args), message)
    assert list(tmp_path.iterdir()) == []


def test_create_never_overwrites(tmp_path: Path, capsys) -> None:
    img = tmp_path / "precious.img"
    img.write_bytes(b"keep")
    one_line_error(run(capsys, "disk", "create", str(img), "--size", "1M"), "already exists")
    assert img.read_bytes() == b"keep"


def test_info_errors(tmp_path: Path, capsys) -> None:
    one_line_error(run(capsys, "disk", "info", str(tmp_path / "nope.qcow2")), "does not exist")
    img = tmp_path / "x.qcow2"
    run(capsys, "disk", "create", str(img), "--size", "1M")
    with open(img, "r+b") as f:
        f.seek(20)
        f.write(struct.pack(">I", 40))               # cluster_bits 40
    one_line_error(run(capsys, "disk", "info", str(img)), "cluster_bits 40")
    img2 = tmp_path / "y.qcow2"
    run(capsys, "disk", "create", str(img2), "--size", "1M")
    held = Qcow2Backend(img2)                        # a VM has it
    try:
        one_line_error(run(capsys, "disk", "info", str(img2)), "in use by another VM")
    finally:
        held.close()
    one_line_error(run(capsys, "disk"), "needs an action")


def test_create_says_what_it_made_and_sizes_read_as_typed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "a.qcow2"
    code, out, _ = run(capsys, "disk", "create", str(img), "--size", "8")       # a bare number: GiB
    assert code == 0 and out == f"{img} created (qcow2, virtual size 8G)\n"
    code, out, _ = run(capsys, "disk", "create", str(tmp_path / "b.qcow2"), "--size", "1.5G")
    assert code == 0 and "virtual size 1536M" in out
    code, out, _ = run(capsys, "disk", "info", str(img), "--json")
    info = json.loads(out)
    assert code == 0 and info["virtual_size"] == 8 << 30 and info["check"]["errors"] == []
