"""Character backends: buffers, tee, and stdio over pipes and a pty."""

from __future__ import annotations

import os
import pty
import termios
from collections.abc import Iterator

import pytest

from pyvirt.backends.char import ESCAPE_HELP, BufferBackend, StdioBackend, TeeBackend
from pyvirt.testing.fakes import FakeCharBackend


def test_buffer_backend() -> None:
    b = BufferBackend(limit=8)
    got: list[bytes] = []
    b.feed(b"early")                              # before a handler: kept
    b.set_input_handler(got.append)
    assert got == [b"early"]
    b.feed(b"x")
    assert got == [b"early", b"x"]
    b.write(b"0123456789")
    assert bytes(b.output) == b"23456789"         # limited to the last 8 bytes
    assert b.take_output() == b"23456789" and b.output == b""
    assert b.fileno() is None


def test_tee_backend() -> None:
    main, cap = FakeCharBackend(), BufferBackend()
    t = TeeBackend(main, cap)
    got: list[bytes] = []
    t.set_input_handler(got.append)
    t.write(b"hello")
    main.type_later(b"in")
    t.poll()
    assert main.output == b"hello" and cap.output == b"hello" and got == [b"in"]
    quit_calls: list[int] = []
    t.on_quit = lambda: quit_calls.append(1)
    assert main.on_quit is not None
    t.close()
    assert main.closed and not cap.closed


class Pipes:
    def __init__(self) -> None:
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        os.set_blocking(self.out_r, False)

    def output(self) -> bytes:
        try:
            return os.read(self.out_r, 1 << 16)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        for fd in (self.in_r, self.in_w, self.out_r, self.out_w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    p = Pipes()
    yield p
    p.close()


def test_stdio_output_buffered_until_newline_or_poll(pipes: Pipes) -> None:
    s = StdioBackend(stdin_fd=pipes.in_r, stdout_fd=pipes.out_w)
    s.write(b"a")
    s.write(b"b")
    assert pipes.output() == b""                  # not a system call per byte
    s.write(b"c\n")
    assert pipes.output() == b"abc\n"             # a line appears at once
    s.write(b"prompt$ ")
    assert pipes.output() == b""
    s.poll()                                      # the run loop polls between slices
    assert pipes.output() == b"prompt$ "
    s.write(b"x" * 5000)                          # a full buffer goes out without a newline
    assert len(pipes.output()) == 5000
    s.close()


def test_stdio_input_from_pipe_passes_everything(pipes: Pipes) -> None:
    s = StdioBackend(stdin_fd=pipes.in_r, stdout_fd=pipes.out_w)
    assert not s.escapes and s.fileno() == pipes.in_r
    got: list[bytes] = []
    s.set_input_handler(got.append)
    s.poll()                                      # nothing to read: does not block
    assert got == []
    os.write(pipes.in_w, b"ls\x01x\n")
    s.poll()
    assert got == [b"ls\x01x\n"]                  # no escapes on a pipe
    os.close(pipes.in_w)
    s.poll()
    assert s.fileno() is None                     # end of input: stop reading
    s.close()


def test_stdio_escapes(pipes: Pipes) -> None:
    quits: list[int] = []
    s = StdioBackend(stdin_fd=pipes.in_r, stdout_fd=pipes.out_w, escapes=True,
                     on_quit=lambda: quits.append(1))
    got: list[bytes] = []
    s.set_input_handler(got.append)
    os.write(pipes.in_w, b"a\x01\x01b\x01")       # C-a C-a sends one C-a; a lone C-a waits
    s.poll()
    assert b"".join(got) == b"a\x01b" and not quits
    os.write(pipes.in_w, b"h")                    # ... for the next read: C-a h
    s.poll()
    assert pipes.output() == ESCAPE_HELP
    os.write(pipes.in_w, b"\x01zc\x01x")          # unknown escape dropped; C-a x quits
    s.poll()
    assert b"".join(got) == b"a\x01bc" and quits == [1]
    s.close()


def test_stdio_not_interactive(pipes: Pipes) -> None:
    s = StdioBackend(interactive=False, stdin_fd=pipes.in_r, stdout_fd=pipes.out_w)
    got: list[bytes] = []
    s.set_input_handler(got.append)
    os.write(pipes.in_w, b"ignored")
    s.poll()
    assert s.fileno() is None and got == []
    s.write(b"out\n")
    assert pipes.output() == b"out\n"
    s.close()
    assert os.read(pipes.in_r, 100) == b"ignored"  # stdin was never read


def test_stdio_reader_gone(pipes: Pipes) -> None:
    s = StdioBackend(interactive=False, stdout_fd=pipes.out_w)
    os.close(pipes.out_r)
    s.write(b"nobody listens\n")                  # EPIPE: output dropped, no exception
    s.write(b"more\n")
    s.close()


def test_stdio_raw_mode_on_a_tty_is_restored() -> None:
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        s = StdioBackend(stdin_fd=slave, stdout_fd=slave)
        raw = termios.tcgetattr(slave)
        assert s.escapes
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO and not raw[3] & termios.ISIG
        got: list[bytes] = []
        s.set_input_handler(got.append)
        os.write(master, b"\x03q")                # Ctrl-C goes to the guest in raw mode
        s.poll()
        assert got == [b"\x03q"]
        s.close()
        assert termios.tcgetattr(slave) == before
        s.close()                                 # idempotent
    finally:
        os.close(master)
        os.close(slave)
