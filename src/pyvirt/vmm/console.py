"""The VM console on the user's terminal (interactive) or on stdout (scripted)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pyvirt.backends.char import StdioBackend


@contextlib.contextmanager
def open_console(interactive: bool = True) -> Iterator[StdioBackend]:
    """Raw terminal with Ctrl-A escapes when interactive; restored on exit, whatever happens."""
    console = StdioBackend(interactive=interactive)
    try:
        yield console
    finally:
        console.close()
