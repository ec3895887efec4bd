"""Errors of `pyvirt run`/`disk` in the user's words (issue 18 item 7): flags and sizes as typed,
the right subcommand's --help, --state-dir before the subcommand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyvirt.spec import format_size, parse_size
from pyvirt.testing.cli import one_line_error, run


@pytest.fixture
def kernel(tmp_path: Path) -> str:
    k = tmp_path / "Image"
    k.write_bytes(b"\0" * 4096)
    return str(k)


@pytest.mark.parametrize("args, words", [
    (["--memory", "1T"], "--memory 1T: at most 64G"),
    (["--memory", "8M"], "--memory 8M: at least 16M"),
    (["--memory", "lots"], "--memory lots: expected a size"),
    (["--cpus", "20"], "--cpus 20: at most 8"),
    (["--cpus", "0"], "--cpus 0: at least 1"),
])
def test_run_errors_name_the_flag_and_the_size_as_typed(capsys: Any, kernel: str, args: list[str],
                                                         words: str) -> None:
    result = run(capsys, "run", "--kernel", kernel, *args)
    one_line_error(result, words)
    assert "Input should" not in result[2] and "68719476736" not in result[2]


@pytest.mark.parametrize("args, help_of", [
    (["run", "--bogus"], "'pyvirt run --help'"),
    (["disk", "create", "x.qcow2", "--bogus"], "'pyvirt disk create --help'"),
    (["ls", "--bogus"], "'pyvirt ls --help'"),
    (["create", "vm", "--no-such-flag"], "'pyvirt create --help'"),
    (["network", "ls", "extra"], "'pyvirt network ls --help'"),
])
def test_usage_errors_point_at_the_subcommands_help(capsys: Any, args: list[str], help_of: str) -> None:
    with pytest.raises(SystemExit) as e:
        run(capsys, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and help_of in err, err


def test_state_dir_before_the_subcommand(capsys: Any, tmp_path: Path) -> None:
    # no daemon there: the command got the directory (it names its socket)
    one_line_error(run(capsys, "--state-dir", str(tmp_path), "ls"), f"{tmp_path}/pyvirtd.sock")
    with pytest.raises(SystemExit):
        run(capsys, "--state-dir", str(tmp_path), "run")
    assert "--state-dir goes with the pyvirtd commands" in capsys.readouterr().err


def test_sizes_as_typed() -> None:
    assert parse_size("1.5G") == 3 << 29 and parse_size("8", default_unit="g") == 8 << 30
    assert format_size(64 << 30) == "64G" and format_size(320 << 20) == "320M" and format_size(1000) == "1000"


@pytest.mark.parametrize("flag", ["--kernel", "--initrd", "--bios"])
def test_a_boot_file_that_is_a_fifo_or_a_device_is_one_line_not_a_hang(capsys: Any, tmp_path: Path,
                                                                        flag: str) -> None:
    """`--kernel /dev/zero` was read until memory ran out (the code cache hashed it first), a FIFO
    as --kernel, --initrd or --bios waited for a writer forever."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    what = {"--kernel": "kernel", "--initrd": "initrd", "--bios": "firmware"}[flag]
    image = tmp_path / "Image"                                       # (a Linux Image header)
    image.write_bytes(bytes(48) + b"RISCV\0\0\0RSC\x05" + bytes(4096))
    extra = ["--kernel", str(image)] if flag == "--initrd" else []
    command = [] if flag == "--bios" else ["--command", "true"]
    for path in (str(fifo), "/dev/zero"):
        one_line_error(run(capsys, "run", *extra, flag, path, *command), f"{what} {path} is not a regular file")
