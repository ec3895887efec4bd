"""A pyvirtd daemon for tests: a real daemon process on a state directory, and the helpers
the daemon tests share (tests/host/conftest.py makes fixtures of them)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from pyvirt.host.client import Client
from pyvirt.host.paths import proc_start_time
from pyvirt.host.store import Store
from pyvirt.testing import stretch

PY = sys.executable
T = TypeVar("T")


class Daemon:
    """A pyvirtd process on `state`; `restart()` stops it (SIGTERM) and starts another."""

    def __init__(self, state: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.state = state
        self.env = dict(os.environ, **(env or {}))
        self.args = list(args or [])          # pyvirtd's options (--tls-creds DIR)
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Client(state_dir=state)
        self.start()

    def start(self) -> None:
        log = open(self.state / "test-daemon.log", "ab")
        self.proc = subprocess.Popen([PY, "-m", "pyvirt.host.daemon", "--state-dir", str(self.state), *self.args],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(Exception):
                self.client.info()
                return
            assert self.proc.poll() is None, (self.state / "test-daemon.log").read_text()
            assert time.monotonic() < deadline, "pyvirtd did not come up"
            time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=20)
        self.proc = None
        return code

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "pyvirt", *args, "--state-dir", str(self.state)],
                              capture_output=True, text=True, timeout=stretch(timeout), stdin=subprocess.DEVNULL)

    def cleanup(self) -> None:
        """End every runner this daemon started (whatever state the test left it in)."""
        runners = []
        if self.proc is not None:
            with contextlib.suppress(Exception):
                runners = [(v["name"], v["pid"]) for v in self.client.list() if v["pid"]]
                for name, _ in runners:
                    with contextlib.suppress(Exception):
                        self.client.delete(name, force=True)
            with contextlib.suppress(Exception):
                self.stop()
        store = Store(self.state / "pyvirtd.db")      # runners the daemon could not end
        for rec in store.all():
            if rec.pid and proc_start_time(rec.pid) == rec.pid_start:
                with contextlib.suppress(OSError):
                    os.killpg(rec.pid, signal.SIGKILL)
        store.close()
        self.client.close()


def wait_for(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """`pred()` once it is true (polled every `interval` s); an AssertionError after `timeout` s
    (on the native engine; `stretch`ed for a slower one)."""
    deadline = time.monotonic() + stretch(timeout)
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def wait_agent(client: Client, name: str, timeout: float = 120) -> None:
    """Wait until VM `name`'s guest agent runs a command (a booting guest)."""
    from pyvirt.host.agent import AgentError

    def answers() -> bool:
        try:
            return client.run(name, ["true"])[0] == 0
        except AgentError:
            return False
    wait_for(answers, timeout, f"VM {name}'s guest agent", interval=0.5)


# A guest counter loop for snapshot tests: one "C=<n> before" line every 0.2 s, where "before" is
# read from /tmp/f, written before any snapshot (so its presence after a restore shows /tmp survived).
COUNTER = "i=0; echo before > /tmp/f; while true; do i=$((i+1)); echo C=$i $(cat /tmp/f); sleep 0.2; done"


def counts(text: str) -> list[int]:
    """The counter values in a console log, in order."""
    return [int(n) for n in re.findall(r"C=(\d+)", text)]


def start_disk_vm(d: Daemon, tmp_path: Path, command: str) -> tuple[Path, dict[str, Any]]:
    """VM "v" with a fresh 1 MiB raw disk of its own (in its directory: imported, so that its
    snapshots freeze it in place and move the VM to new overlays -- a disk the user gave is
    copied instead, and the VM keeps writing it) running `command` on the default guest, started.
    Returns v's disk and its record."""
    from pyvirt.images import cached_default_image
    if cached_default_image() is None:
        raise AssertionError("the default image is not built: `make test` runs `pyvirt image build` first")
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    d.client.create("v0", memory="64M", disks=[str(disk)], command=command)
    d.client.export("v0", tmp_path / "v0.tar")
    vm = d.client.import_(tmp_path / "v0.tar", name="v")
    d.client.start("v")
    own = Path(vm["spec"]["disks"][0]["path"])
    assert own.is_relative_to(d.state)
    return own, vm
