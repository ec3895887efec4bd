"""`pyvirt port` stops on Ctrl-C even when the kernel hands the SIGINT to a forwarding thread.

A whole-suite run once saw `pyvirt port` ignore SIGINT for 30 s: with a connection being
forwarded the process has several threads, the kernel may deliver a process-directed
signal to any of them, and CPython then only sets a flag that the main thread checks
when it runs bytecode -- which it never did while blocked in accept().  Here the SIGINT
is sent to the forwarding thread itself (tgkill), which is what that run left to chance.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="tgkill is Linux's")

SYS_TGKILL = 234                                   # x86-64
FORWARDER = textwrap.dedent("""
    import sys, threading
    from pyvirt.host import agent_cli

    class Client:                                  # a VM whose guest port never answers
        def inspect(self, name): return {}
        def tcp(self, name, port):
            threading.Event().wait()               # the forwarding thread blocks here

    sys.exit(agent_cli._port(Client(), "vm", sys.argv[1] + ":80"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the syscall number is x86-64's")
def test_a_sigint_taken_by_a_forwarding_thread_still_stops_it(tmp_path: Path) -> None:
    port = _free_port()
    src = Path(__file__).resolve().parents[2] / "src"
    p = subprocess.Popen([sys.executable, "-c", FORWARDER, str(port)], env={**os.environ, "PYTHONPATH": str(src)},
                         stderr=subprocess.PIPE)
    try:
        assert p.stderr is not None
        assert b"forwarding" in p.stderr.readline()
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        deadline = time.monotonic() + 10
        workers: list[int] = []
        while not workers and time.monotonic() < deadline:
            workers = [int(t) for t in os.listdir(f"/proc/{p.pid}/task") if int(t) != p.pid]
            time.sleep(0.05)
        assert workers, "no forwarding thread"
        libc = ctypes.CDLL(None, use_errno=True)
        for tid in workers:
            assert libc.syscall(SYS_TGKILL, p.pid, tid, signal.SIGINT) == 0
        assert p.wait(timeout=10) == 0              # before the fix: still in accept() after 30 s
        c.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
