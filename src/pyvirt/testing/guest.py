"""Running pyvirt the way a user does, for tests that boot the default guest: `pyvirt(...)`
runs the CLI to its end; `PtyConsole` runs `pyvirt run` on a pseudo-terminal."""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass

from pyvirt.testing import stretch

GATEWAY = "$(ip route | awk '/^default/ {print $3}')"     # in the guest: passt's gateway


@dataclass
class Run:
    code: int
    out: str
    err: str


def pyvirt(*args: str, timeout: float = 600, stdin: bytes | None = None) -> Run:
    p = subprocess.run([sys.executable, "-m", "pyvirt", *args], input=stdin or b"",
                       capture_output=True, timeout=stretch(timeout), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return Run(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


class PtyConsole:
    """A `pyvirt run ...` on a pseudo-terminal, as a user's console: `expect(pattern)` reads
    until the output matches (or fails at the deadline), `send(data)` types."""

    def __init__(self, *args: str, timeout: float) -> None:
        import pty
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execv(sys.executable, [sys.executable, "-m", "pyvirt", "run", *args])
        self.buf = b""
        self.deadline = time.monotonic() + stretch(timeout)

    def expect(self, pattern: bytes) -> None:
        while not re.search(pattern, self.buf):
            assert time.monotonic() < self.deadline, f"no {pattern!r} in {self.buf[-800:]!r}"
            r, _, _ = select.select([self.fd], [], [], 1)
            if r:
                try:
                    self.buf += os.read(self.fd, 4096)
                except OSError:
                    break

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status once the VMM ends (reading its console meanwhile), None at the timeout."""
        end = time.monotonic() + stretch(timeout)
        while time.monotonic() < end:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                if select.select([self.fd], [], [], 0.5)[0]:
                    self.buf += os.read(self.fd, 4096)
        return None

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
