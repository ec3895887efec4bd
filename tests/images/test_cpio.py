"""The newc cpio writer: parsed back by our reader and, when installed, by GNU cpio."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pyvirt.images.cpio import CpioWriter, read_newc


def _sample() -> CpioWriter:
    w = CpioWriter()
    w.directory("dev")
    w.char_device("dev/console", 5, 1)
    w.char_device("/dev/null", 1, 3, 0o666)
    w.file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3 + b"x", 0o755)   # odd length: padding
    w.symlink("bin/sh", "/bin/busybox")
    w.file("etc/empty", b"")
    w.file("a/b/c/deep", b"deep")                                                  # parents are made
    w.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    return w


def test_round_trip_through_our_reader() -> None:
    data = _sample().to_bytes()
    assert len(data) % 4 == 0
    entries = {e.name: e for e in read_newc(data)}
    assert list(entries)[:3] == ["dev", "dev/console", "dev/null"]
    assert stat.S_ISCHR(entries["dev/console"].mode) and entries["dev/console"].rdev == (5, 1)
    assert entries["dev/null"].mode == stat.S_IFCHR | 0o666 and entries["dev/null"].rdev == (1, 3)
    assert entries["bin"].mode == stat.S_IFDIR | 0o755
    assert entries["bin/busybox"].data.startswith(b"\x7fELF") and len(entries["bin/busybox"].data) == 773
    assert stat.S_ISLNK(entries["bin/sh"].mode) and entries["bin/sh"].data == b"/bin/busybox"
    assert entries["etc/empty"].data == b"" and entries["a/b/c/deep"].data == b"deep"
    for parent in ("a", "a/b", "a/b/c", "etc"):
        assert stat.S_ISDIR(entries[parent].mode)
    # Every header starts 4-aligned and the archive ends in the trailer.
    assert data[:6] == b"070701" and b"TRAILER!!!\0" in data[-128:]


def test_names_are_checked() -> None:
    w = CpioWriter()
    w.file("x", b"")
    for bad in ("", "/", "a/../b", "./a", "a//b", "x"):
        with pytest.raises(ValueError):
            w.file(bad, b"")
    with pytest.raises(ValueError, match="not a directory"):
        w.file("x/y", b"")
    assert "x" in w and "/x" in w and "y" not in w


def test_reader_rejects_malformed_archives() -> None:
    data = _sample().to_bytes()
    for broken in (data[:50], data[:len(data) // 2], b"070707" + data[6:], data[:6] + b"XYZ" + data[9:],
                   data[:-120]):
        with pytest.raises(ValueError):
            read_newc(broken)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(_sample().to_bytes())
    names = subprocess.run(["cpio", "-t", "--quiet", "-F", str(archive)], capture_output=True,
                           text=True, check=True).stdout.split()
    assert names == [e.name for e in read_newc(archive.read_bytes())]
    listing = subprocess.run(["cpio", "-t", "-v", "--quiet", "-F", str(archive)], capture_output=True,
                             text=True, check=True).stdout
    assert any(line.startswith("crw-------") and "5,   1" in line for line in listing.splitlines())
    out = tmp_path / "out"
    out.mkdir()
    # Extract everything but the device nodes (those need privileges this test should not assume).
    subprocess.run(["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "-F", str(archive), "-f",
                    "dev/*"], cwd=out, check=True, capture_output=True)
    assert (out / "bin/busybox").read_bytes() == next(e.data for e in _sample().entries if e.name == "bin/busybox")
    assert os.readlink(out / "bin/sh") == "/bin/busybox"
    assert (out / "a/b/c/deep").read_text() == "deep"
    assert (out / "init").stat().st_mode & 0o777 == 0o755
