"""pyvirtd's errors through the CLI in the user's words (issue 18 item 7): flags, not the API's
field names; sizes as typed; the snapshot-name rule for snapshot names; a busy console refused."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirt.host import cli as host_cli
from pyvirt.host import runner
from pyvirt.testing.daemon import Daemon, wait_for


def one_line(r: subprocess.CompletedProcess[str], words: str) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert words in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["--memory", "1T"], "--memory 1T: at most 64G"),
    (["--memory", "12X"], "--memory 12X: expected a size"),
    (["--cpus", "20"], "--cpus 20: at most 8"),
    (["--memory-limit", "100M"], "--memory-limit 100M: too small for 256M of guest RAM"),
    (["--cpu-quota", "5"], "--cpu-quota 5: more than the VM's 1 cpu(s)"),
    (["--cpu-quota", "-1"], "--cpu-quota -1: must be more than 0"),
])
def test_create_errors_speak_in_flags(bare_daemon: Daemon, tmp_path: Path, args: list[str], words: str) -> None:
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"\0" * 4096)
    line = one_line(bare_daemon.cli("create", "vm", "--kernel", str(kernel), *args), words)
    for internal in ("memory_limit", "cpu_quota", "invalid request", "Input should", "Value error", "104857600"):
        assert internal not in line, line


def test_bad_names_get_their_own_rule(bare_daemon: Daemon) -> None:
    one_line(bare_daemon.cli("create", "bad/name"), "bad/name: a VM name is")
    one_line(bare_daemon.cli("snapshot", "vm", "bad/name"), "bad/name: a snapshot name is")


def test_state_dir_before_the_subcommand(bare_daemon: Daemon) -> None:
    r = subprocess.run([sys.executable, "-m", "pyvirt", "--state-dir", str(bare_daemon.state), "ls"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("NAME"), r.stderr


def test_the_cli_knows_the_runners_busy_line() -> None:
    assert runner.BUSY.startswith(host_cli.BUSY)


def test_a_second_console_client_is_refused(daemon: Daemon) -> None:
    daemon.client.create("con", memory="64M", command="sleep 1000")
    daemon.client.start("con")
    sock = daemon.client.console_socket("con")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(str(sock))
    try:
        wait_for(lambda: daemon.client._call("GET", "/vms/con").get("state") == "running", 30, "running")
        r = daemon.cli("console", "con")
        one_line(r, "the console of con is busy")
        assert "attached" not in r.stderr.replace("is attached", "")
    finally:
        first.close()


def test_more_ram_than_the_host_gives_is_one_line(daemon: Daemon) -> None:
    daemon.client.create("huge", memory="64G", command="true")
    r = daemon.cli("start", "huge")
    if r.returncode == 0:                            # a host that maps 64G lazily: nothing to say
        daemon.client.kill("huge")
        return
    one_line(r, "--memory 64G: this host cannot give the VM that much RAM")
