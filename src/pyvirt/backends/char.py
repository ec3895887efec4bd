"""Character backends: where a console's bytes come from and go to.

A `CharBackend` knows nothing about UARTs or virtio consoles.  It takes
output with `write()`, delivers input to the handler set with
`set_input_handler()`, exposes a file descriptor (or None) the VMM's event
loop can wait on, pumps input and flushes output in `poll()`, and restores
whatever it changed in `close()`.

* `StdioBackend` -- the user's terminal (or pipes): raw mode on a tty with
  the settings restored on close and at exit, QEMU-style Ctrl-A escapes, and
  output buffered until a newline, a full buffer or the next `poll()`, so a
  guest printing byte by byte costs one system call per line, not per byte.
* `BufferBackend` -- in memory, for tests and for capturing `--command` output.
* `TeeBackend` -- a primary backend plus copies of its output elsewhere (show
  the console and capture it at the same time).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import termios
import tty
from collections.abc import Callable
from typing import Any, Protocol

CTRL_A = 0x01
ESCAPE_HELP = (b"\r\nC-a h    print this help\r\n"
               b"C-a x    exit pyvirt\r\n"
               b"C-a C-a  send C-a to the guest\r\n")

InputHandler = Callable[[bytes], None]


class CharBackend(Protocol):
    def write(self, data: bytes) -> None: ...

    def set_input_handler(self, handler: InputHandler | None) -> None: ...

    def fileno(self) -> int | None: ...

    def poll(self) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class _InputMixin:
    """Input delivery shared by the backends: bytes that arrive before a
    handler is set are kept and handed over when one is."""

    _handler: InputHandler | None
    _early: bytearray

    def set_input_handler(self, handler: InputHandler | None) -> None:
        self._handler = handler
        if handler is not None and self._early:
            data = bytes(self._early)
            self._early.clear()
            handler(data)

    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        if self._handler is None:
            self._early += data
        else:
            self._handler(data)


class BufferBackend(_InputMixin):
    """In-memory console: output collects in `output`, `feed()` types input.

    With `limit`, only the last `limit` output bytes are kept (a capture that
    cannot grow without bound).
    """

    def __init__(self, limit: int | None = None) -> None:
        self.output = bytearray()
        self.limit = limit
        self.closed = False
        self.on_quit: Callable[[], None] | None = None
        self._handler = None
        self._early = bytearray()

    def write(self, data: bytes) -> None:
        self.output += data
        if self.limit is not None and len(self.output) > self.limit:
            del self.output[:len(self.output) - self.limit]

    def feed(self, data: bytes) -> None:
        """Input, as if typed."""
        self._deliver(bytes(data))

    def take_output(self) -> bytes:
        """The output so far, which is then cleared."""
        data = bytes(self.output)
        self.output.clear()
        return data

    def fileno(self) -> int | None:
        return None

    def poll(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def save(self) -> dict[str, Any]:
        return {"early": bytes(self._early)}

    def load(self, state: dict[str, Any]) -> None:
        self._early = bytearray(state["early"])


class StdioBackend(_InputMixin):
    """The terminal: raw mode on a tty, Ctrl-A escapes, buffered output.

    `interactive=False` never reads stdin (scripted runs such as `--command`);
    output still goes to stdout.  `escapes` defaults to on when stdin is a tty:
    Ctrl-A x calls `on_quit`, Ctrl-A h prints help, Ctrl-A Ctrl-A sends one
    Ctrl-A; any other character after Ctrl-A is dropped with it, as QEMU does.
    With stdin a pipe every byte goes to the guest unchanged.
    """

    FLUSH_AT = 4096
    READ_CHUNK = 4096

    def __init__(self, interactive: bool = True, stdin_fd: int = 0, stdout_fd: int = 1,
                 escapes: bool | None = None, on_quit: Callable[[], None] | None = None) -> None:
        self.in_fd: int | None = stdin_fd if interactive else None
        self.out_fd: int | None = stdout_fd
        self.on_quit = on_quit
        self._handler = None
        self._early = bytearray()
        self._buf = bytearray()
        self._escape = False
        self._saved: list[Any] | None = None
        self._tty_fd = stdin_fd
        is_tty = self.in_fd is not None and os.isatty(self.in_fd)
        self.escapes = is_tty if escapes is None else escapes
        if is_tty and self.in_fd is not None:
            self._saved = termios.tcgetattr(self.in_fd)
            atexit.register(self._restore_tty)
            tty.setraw(self.in_fd)

    # -- output --------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.out_fd is None:
            return
        self._buf += data
        if len(self._buf) >= self.FLUSH_AT or b"\n" in data:
            self.flush()

    def flush(self) -> None:
        """Write out everything buffered (waits while stdout is full)."""
        while self._buf and self.out_fd is not None:
            try:
                n = os.write(self.out_fd, self._buf)
            except BlockingIOError:             # someone made stdout non-blocking
                select.select([], [self.out_fd], [], 1.0)
                continue
            except InterruptedError:
                continue
            except OSError:                     # reader gone (EPIPE) or stdout closed
                self._buf.clear()
                self.out_fd = None
                return
            del self._buf[:n]

    # -- input ---------------------------------------------------------------------------
    def fileno(self) -> int | None:
        """The descriptor to wait on for input; None once input has ended."""
        return self.in_fd

    def poll(self) -> None:
        """Flush output; read what input is ready, without blocking."""
        self.flush()
        fd = self.in_fd
        if fd is None:
            return
        try:
            ready, _, _ = select.select([fd], [], [], 0)
            if not ready:
                return
            data = os.read(fd, self.READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError):
            data = b""
        if not data:                           # end of input: stop reading
            self.in_fd = None
            return
        self._input(data)

    def _input(self, data: bytes) -> None:
        if not self.escapes:
            self._deliver(data)
            return
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in b"xX":
                    self._deliver(bytes(out))
                    out.clear()
                    if self.on_quit is not None:
                        self.on_quit()
                elif b in b"hH?":
                    self._buf += ESCAPE_HELP
                    self.flush()
                elif b == CTRL_A:
                    out.append(CTRL_A)
                continue
            if b == CTRL_A:
                self._escape = True
            else:
                out.append(b)
        self._deliver(bytes(out))

    # -- teardown ------------------------------------------------------------------------
    def _restore_tty(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self._tty_fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def close(self) -> None:
        """Flush output and give the terminal its settings back; idempotent."""
        self.flush()
        self._restore_tty()
        atexit.unregister(self._restore_tty)
        self.in_fd = None


class TeeBackend:
    """The primary backend, with its output also copied to `taps`.

    Input, the file descriptor and escapes are the primary's; `close()`
    closes the primary only (taps usually outlive the run to be read).
    """

    def __init__(self, primary: CharBackend, *taps: CharBackend) -> None:
        self.primary = primary
        self.taps = list(taps)

    @property
    def on_quit(self) -> Callable[[], None] | None:
        return getattr(self.primary, "on_quit", None)

    @on_quit.setter
    def on_quit(self, callback: Callable[[], None] | None) -> None:
        self.primary.on_quit = callback  # type: ignore[attr-defined]

    def write(self, data: bytes) -> None:
        self.primary.write(data)
        for t in self.taps:
            t.write(data)

    def set_input_handler(self, handler: InputHandler | None) -> None:
        self.primary.set_input_handler(handler)

    def fileno(self) -> int | None:
        return self.primary.fileno()

    def poll(self) -> None:
        self.primary.poll()
        for t in self.taps:
            t.flush()

    def flush(self) -> None:
        self.primary.flush()
        for t in self.taps:
            t.flush()

    def close(self) -> None:
        self.primary.close()
        for t in self.taps:
            t.flush()
