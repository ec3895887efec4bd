"""The pyvirtd commands of the `pyvirt` CLI: output, and one-line errors with non-zero exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirt.testing.daemon import Daemon, wait_for


def one_line_error(r: subprocess.CompletedProcess[str], words: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert words in lines[0], lines[0]


def test_no_daemon(state_dir: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pyvirt", "ls", "--state-dir", str(state_dir)],
                       capture_output=True, text=True, timeout=60)
    one_line_error(r, "pyvirtd is not running")


def test_daemon_command_starts_one_daemon(state_dir: Path) -> None:
    cmd = [sys.executable, "-m", "pyvirt", "daemon", "--state-dir", str(state_dir)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(state_dir / "pyvirtd.sock"), r.stderr
    try:
        one_line_error(subprocess.run(cmd, capture_output=True, text=True, timeout=60), "already running")
    finally:
        pid = int((state_dir / "pyvirtd.lock").read_text())
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not (state_dir / "pyvirtd.sock").exists(), 10, "the daemon to end")


@pytest.mark.parametrize("args, words", [
    (["create", "x", "--memory", "huge"], "memory"),
    (["create", "x", "--cpus", "99"], "cpus"),
    (["create", "bad/name"], "VM name"),
    (["create", "x", "--disk", "/no/such.img"], "no such file"),
    (["start", "ghost"], "no VM named ghost"),
    (["stop", "ghost"], "no VM named ghost"),
    (["stop", "ghost", "--timeout", "-1"], "--timeout"),
    (["console", "ghost"], "no VM named ghost"),
    (["logs", "ghost"], "no VM named ghost"),
    (["rm", "ghost"], "no VM named ghost"),
])
def test_errors_are_one_line(daemon: Daemon, args: list[str], words: str) -> None:
    one_line_error(daemon.cli(*args), words)


def test_create_inspect_logs_rm(daemon: Daemon) -> None:
    r = daemon.cli("create", "job", "--memory", "64M", "--command", "echo one; sleep 2; echo two")
    assert r.returncode == 0 and r.stdout.split()[0] == "job", r.stderr
    doc = json.loads(daemon.cli("inspect", "job").stdout)
    assert doc["name"] == "job" and doc["state"] == "stopped" and doc["spec"]["memory"] == 64 << 20
    assert daemon.cli("start", "job").stdout.split() == ["job", "running"]
    one_line_error(daemon.cli("console", "nosuch"), "no VM")
    one_line_error(daemon.cli("rm", "job"), "stop it first")
    follow = daemon.cli("logs", "-f", "job", timeout=60)           # returns when the VM powers off
    assert follow.returncode == 0 and follow.stdout == "one\ntwo\n", follow
    assert daemon.client.inspect("job")["state"] == "stopped"
    one_line_error(daemon.cli("console", "job"), "not running")
    assert daemon.cli("logs", "job", "--tail", "1").stdout == "two\n"          # lines, as docker counts
    assert daemon.cli("logs", "job", "--tail", "4").stdout == "one\ntwo\n"
    assert daemon.cli("rm", "job").returncode == 0
    assert "job" not in daemon.cli("ls").stdout
