"""Character backends: where a console's bytes come from and go to.

A `CharBackend` knows nothing about UARTs: it takes output with `write()`,
delivers input to the handler set with `set_input_handler()`, exposes a file
descriptor (or None) for the VMM's event loop, and pumps input and flushes
output in `poll()`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import tty
from collections.abc import Callable
from typing import Protocol

CTRL_A = 0x01
ESCAPE_HELP = (b"\r\nC-a h    print this help\r\nC-a x    exit pyvirt\r\n"
               b"C-a C-a  send C-a to the guest\r\n")


class CharBackend(Protocol):
    def write(self, data: bytes) -> None: ...

    def set_input_handler(self, handler: Callable[[bytes], None]) -> None: ...

    def fileno(self) -> int | None: ...

    def poll(self) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class BufferBackend:
    """In-memory console: output collects in `output`; `feed()` types input."""

    def __init__(self) -> None:
        self.output = bytearray()
        self._handler: Callable[[bytes], None] | None = None
        self.on_quit: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        self.output += data

    def set_input_handler(self, handler: Callable[[bytes], None]) -> None:
        self._handler = handler

    def feed(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler(data)

    def fileno(self) -> int | None:
        return None

    def poll(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class StdioBackend:
    """The terminal: raw mode on a tty, QEMU-style Ctrl-A escapes, buffered output.

    With `interactive=False` stdin is not read at all (scripted runs); output
    still goes to stdout, flushed at every poll and at each newline batch.
    """

    FLUSH_AT = 4096

    def __init__(self, interactive: bool = True, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self.in_fd = stdin_fd if interactive else None
        self.out_fd = stdout_fd
        self._handler: Callable[[bytes], None] | None = None
        self.on_quit: Callable[[], None] | None = None
        self._buf = bytearray()
        self._escape = False
        self._saved: list[object] | None = None
        if self.in_fd is not None and os.isatty(self.in_fd):
            self._saved = termios.tcgetattr(self.in_fd)
            tty.setraw(self.in_fd)
        if self.in_fd is not None:
            os.set_blocking(self.in_fd, False)

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        while self._buf:
            try:
                n = os.write(self.out_fd, self._buf)
            except BlockingIOError:
                continue
            except BrokenPipeError:
                self._buf.clear()
                return
            del self._buf[:n]

    def set_input_handler(self, handler: Callable[[bytes], None]) -> None:
        self._handler = handler

    def fileno(self) -> int | None:
        return self.in_fd

    def poll(self) -> None:
        self.flush()
        if self.in_fd is None:
            return
        try:
            data = os.read(self.in_fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        if not data:                       # end of input: stop reading
            self.in_fd = None
            return
        self._input(data)

    def _input(self, data: bytes) -> None:
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in (ord("x"), ord("X")):
                    if self.on_quit:
                        self.on_quit()
                    continue
                if b in (ord("h"), ord("H"), ord("?")):
                    os.write(self.out_fd, ESCAPE_HELP)
                    continue
                if b == CTRL_A:
                    out.append(CTRL_A)
                continue
            if b == CTRL_A:
                self._escape = True
                continue
            out.append(b)
        if out and self._handler is not None:
            self._handler(bytes(out))

    def close(self) -> None:
        self.flush()
        if self._saved is not None and self.in_fd is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self._saved)  # type: ignore[arg-type]
            self._saved = None
        if self.in_fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(self.in_fd, True)


def stdio_is_tty() -> bool:
    return sys.stdin.isatty()
