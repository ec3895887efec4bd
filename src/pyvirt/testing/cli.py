"""Helpers for tests of the command line: run `pyvirt ...` in-process, check one-line errors,
and give a test its own runtime directory for pyvirt networks."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def run(capsys: Any, *args: str) -> tuple[int, str, str]:
    """`pyvirt ARGS...` in this process: (exit status, stdout, stderr); `capsys` is pytest's."""
    from pyvirt.cli import main
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(result: tuple[int, str, str], pattern: str) -> None:
    """A failure reported as one line on stderr that contains `pattern`, and no traceback."""
    code, _, err = result
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


@contextmanager
def runtime_dir() -> Iterator[Path]:
    """A fresh $PYVIRT_RUNTIME_DIR (short: Unix socket paths hold 107 bytes); the networks made
    in it are stopped and the directory removed afterwards."""
    from pyvirt.errors import ConfigError
    from pyvirt.network import list_networks, remove_network
    d = Path(tempfile.mkdtemp(prefix="pvrt-"))
    saved = os.environ.get("PYVIRT_RUNTIME_DIR")
    os.environ["PYVIRT_RUNTIME_DIR"] = str(d)
    try:
        yield d
    finally:
        for n in list_networks():
            try:
                remove_network(n.name)
            except ConfigError:
                pass
        if saved is None:
            os.environ.pop("PYVIRT_RUNTIME_DIR", None)
        else:
            os.environ["PYVIRT_RUNTIME_DIR"] = saved
        shutil.rmtree(d, ignore_errors=True)
