"""pyvirtd as a new user meets it (issue 18 item 4): `pyvirt daemon stop|status`, logs that
say what the daemon and the runners do, and VM host names that are the VMs' names."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from pyvirt.testing.daemon import COUNTER, Daemon, wait_for


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirt", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_daemon_start_status_stop(state_dir: Path) -> None:
    r = cli(state_dir, "daemon", "status")
    assert r.returncode == 3 and "not running" in r.stdout
    r = cli(state_dir, "daemon")
    assert r.returncode == 0 and r.stdout.strip() == str(state_dir / "pyvirtd.sock"), r.stderr
    try:
        r = cli(state_dir, "daemon", "status")
        assert r.returncode == 0 and "is running" in r.stdout and "0 VM(s)" in r.stdout, r.stderr
    finally:
        r = cli(state_dir, "daemon", "stop")
    assert r.returncode == 0 and "pyvirtd stopped" in r.stdout, r.stderr
    assert not (state_dir / "pyvirtd.sock").exists()
    assert cli(state_dir, "daemon", "status").returncode == 3
    r = cli(state_dir, "daemon", "stop")
    assert r.returncode == 1 and "not running" in r.stderr
    log = (state_dir / "pyvirtd.log").read_text()
    assert "listening on" in log and "stopping" in log, log


def test_foreground_daemon_prints_its_log(state_dir: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "daemon", "--foreground", "--state-dir",
                          str(state_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: cli(state_dir, "daemon", "status").returncode == 0, 30, "the daemon")
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
    finally:
        p.kill()
    assert "listening on" in out and "stopping" in out, out


def test_logs_and_host_names(daemon: Daemon) -> None:
    c = daemon.client
    c.create("web-1", memory="64M", command="echo host=$(hostname); " + COUNTER)
    c.start("web-1")
    wait_for(lambda: "C=3" in c.logs("web-1")["text"], 120, "the counter")
    assert "host=web-1" in c.logs("web-1")["text"]
    c.snapshot("web-1", "gold")
    (clone,) = c.clone("gold", 1, prefix="copy")
    assert clone["name"] == "copy-1"
    c.kill("copy-1")
    c.start("copy-1")                                 # a restarted clone boots with its own name
    wait_for(lambda: "host=copy-1" in c.logs("copy-1")["text"], 120, "the clone's boot")
    log = (daemon.state / "test-daemon.log").read_text()
    for words in ("created VM web-1", "started VM web-1", "snapshot gold of VM web-1",
                  "cloned snapshot gold as VM(s) copy-1", "killing VM copy-1"):
        assert words in log, log
    runner_log = Path(c.inspect("web-1")["paths"]["dir"]) / "runner.log"
    assert "VM web-1" in runner_log.read_text() and "snapshot" in runner_log.read_text()


def test_client_wait_and_consistent_output(daemon: Daemon) -> None:
    """README's Client example works as written (wait() for the guest), the listing verbs
    take --json, and the quiet verbs say what they did."""
    c = daemon.client
    c.create("job", memory="64M", command="echo hi; echo there; exit 3")
    c.start("job")
    vm = c.wait("job", timeout=120)
    assert vm["state"] == "stopped" and vm["exit_status"] == 3
    assert c.logs("job")["text"] == "hi\nthere\n"
    assert daemon.cli("logs", "job", "--tail", "1").stdout == "there\n"
    (listed,) = json.loads(daemon.cli("ls", "--json").stdout)
    assert listed["name"] == "job" and listed["state"] == "stopped"
    assert json.loads(daemon.cli("snapshots", "--json").stdout) == []
    r = daemon.cli("rm", "job")
    assert r.returncode == 0 and r.stdout == "job deleted\n", r.stderr


def test_a_guest_panic_crashes_the_vm_with_the_panic_line(daemon: Daemon, tmp_path: Path) -> None:
    """A daemon VM whose guest kernel panics (here: an initrd that is no initramfs, so no root
    file system) is `crashed` soon after, its reason the panic's first line (issue 18 item 2)."""
    bogus = tmp_path / "not-an-initrd.img"
    bogus.write_bytes(b"\x00" * (1 << 20))
    c = daemon.client
    c.create("boom", memory="64M", initrd=str(bogus), command="true")
    c.start("boom")
    wait_for(lambda: c.inspect("boom")["state"] == "crashed", 120, "the panic to be noticed")
    reason = c.inspect("boom")["reason"]
    assert "the guest kernel panicked: Kernel panic - not syncing" in reason, reason
