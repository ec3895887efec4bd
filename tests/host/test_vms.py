"""pyvirtd with real VMs: many at once, crashes, daemon restarts, pause, cgroup limits and the
console, driven through the CLI and the client."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirt.host import control
from pyvirt.host.paths import proc_cpu_ticks, proc_start_time
from pyvirt.testing.daemon import Daemon, wait_for

pytestmark = pytest.mark.slow
TICK = "while :; do echo tick; sleep 1; done"
HZ = os.sysconf("SC_CLK_TCK")


def ok(r) -> str:   # noqa: ANN001
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return r.stdout


def cpu_seconds(pid: int, span: float) -> float:
    before = proc_cpu_ticks(pid)
    time.sleep(span)
    return (proc_cpu_ticks(pid) - before) / HZ


def log_size(vm: dict) -> int:
    return Path(vm["paths"]["console_log"]).stat().st_size


def test_eight_vms_a_crash_and_daemon_restarts(daemon: Daemon) -> None:
    names = [f"vm{i}" for i in range(8)]
    for n in names:
        ok(daemon.cli("create", n, "--memory", "64M", "--command", TICK))
        ok(daemon.cli("start", n))
    listing = ok(daemon.cli("ls"))
    assert len(re.findall(r"^vm\d\s+running\s+\d+", listing, re.M)) == 8, listing
    vms = {n: daemon.client.inspect(n) for n in names}
    pids = {n: vms[n]["pid"] for n in names}
    assert len(set(pids.values())) == 8                           # one process per VM
    for n in names:
        # each runner is a session leader of its own, not in the daemon's session
        assert os.getsid(pids[n]) == pids[n] != os.getsid(daemon.proc.pid)

    os.kill(pids["vm3"], signal.SIGKILL)
    crashed = wait_for(lambda: (v := daemon.client.inspect("vm3"))["state"] == "crashed" and v, 10,
                       "vm3 reported crashed")
    assert "SIGKILL" in crashed["reason"] and crashed["pid"] is None
    others = [n for n in names if n != "vm3"]

    def all_alive() -> None:
        sizes = {n: log_size(vms[n]) for n in others}
        for n in others:
            st = control.request(vms[n]["paths"]["control_socket"], "status")
            assert st["ok"] and st["state"] == "running" and st["pid"] == pids[n]
        wait_for(lambda: all(log_size(vms[n]) > sizes[n] for n in others), 20, "console output of all 7")

    all_alive()
    assert daemon.stop() == 0                                     # SIGTERM: the VMs go on
    assert all(proc_start_time(pids[n]) is not None for n in others)
    daemon.start()
    states = {v["name"]: v["state"] for v in daemon.client.list()}
    assert states == {**{n: "running" for n in others}, "vm3": "crashed"}, states
    assert all(daemon.client.inspect(n)["pid"] == pids[n] for n in others)
    all_alive()

    # A runner that dies while no daemon watches is found crashed by the next one...
    daemon.stop()
    os.kill(pids["vm5"], signal.SIGKILL)
    wait_for(lambda: proc_start_time(pids["vm5"]) is None, 10, "vm5's runner to die")
    daemon.start()
    assert daemon.client.inspect("vm5")["state"] == "crashed"
    # ... and the adopted runners (not the new daemon's children) are still managed.
    vm = daemon.client.stop("vm1", timeout=20)
    assert vm["state"] == "stopped" and vm["reason"] == "poweroff" and vm["exit_status"] == 0
    ok(daemon.cli("kill", "vm2"))
    assert daemon.client.inspect("vm2")["state"] == "stopped"
    assert sorted(v["name"] for v in daemon.client.list() if v["state"] == "running") == \
        ["vm0", "vm4", "vm6", "vm7"]


def test_pause_stops_the_cpu_the_output_and_the_guest_clock(daemon: Daemon) -> None:
    c = daemon.client
    c.create("p", memory="64M", command="while :; do cut -d' ' -f1 /proc/uptime; sleep 0.2; done")
    vm = c.start("p")
    wait_for(lambda: log_size(vm) > 40, 30, "the guest's output")
    assert ok(daemon.cli("pause", "p")).split() == ["p", "paused"]
    time.sleep(0.3)
    size = log_size(vm)
    assert cpu_seconds(vm["pid"], 3.0) < 0.05
    assert log_size(vm) == size
    assert c.inspect("p")["state"] == "paused"
    ok(daemon.cli("resume", "p"))
    wait_for(lambda: log_size(vm) > size + 40, 10, "output after resume")
    uptimes = [float(x) for x in Path(vm["paths"]["console_log"]).read_text().split()]
    gaps = [b - a for a, b in zip(uptimes, uptimes[1:])]
    # the guest slept 0.2 s between lines; the 3+ s pause does not show in its clock
    assert max(gaps) < 1.0, gaps
    assert all(g >= 0 for g in gaps)


def test_cgroup_limits(daemon: Daemon) -> None:
    info = daemon.client.info()["cgroups"]
    if not info["enforced"]:
        pytest.skip(f"cgroup limits are not enforced here: {info['reason']}")
    c = daemon.client
    c.create("busy", memory="64M", command="while :; do :; done", cpu_quota=0.3, memory_limit="400M")
    vm = c.start("busy")
    pid, vid = vm["pid"], vm["id"]
    enforced = vm["limits"]["enforced"]
    assert enforced["cpu_quota"] == 0.3 and enforced["memory_limit"] == 400 << 20 and not enforced["reason"]
    groups = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
    cpu_key = next(k for k in groups if "cpu" in k.split(",") or k == "")
    mem_key = next(k for k in groups if "memory" in k.split(",") or k == "")
    own = re.compile(rf"/pyvirt-[0-9a-f]{{12}}/{vid}$")        # this daemon's own subtree
    assert own.search(groups[cpu_key]) and own.search(groups[mem_key]), groups
    dirs = [Path(d) for d in enforced["cgroups"]]
    if info["version"] == "v1":
        cpu_dir = next(d for d in dirs if (d / "cpu.cfs_quota_us").exists())
        mem_dir = next(d for d in dirs if (d / "memory.limit_in_bytes").exists())
        assert int((cpu_dir / "cpu.cfs_quota_us").read_text()) == 30000
        assert int((cpu_dir / "cpu.cfs_period_us").read_text()) == 100000
        assert int((mem_dir / "memory.limit_in_bytes").read_text()) == 400 << 20
    else:
        assert (dirs[0] / "cpu.max").read_text().split() == ["30000", "100000"]
        assert int((dirs[0] / "memory.max").read_text()) == 400 << 20
    assert str(pid) in (dirs[0] / "cgroup.procs").read_text().split()
    time.sleep(2)                                          # past the boot
    used = cpu_seconds(pid, 5.0) / 5.0
    assert 0.15 <= used <= 0.45, f"a busy guest with a 0.3 CPU quota used {used:.2f} CPU"
    # a helper left behind in the VM's cgroups (as passt would be after a crash) goes with them
    helper = subprocess.Popen(["sleep", "300"])
    for d in dirs:
        (d / "cgroup.procs").write_text(str(helper.pid))
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: c.inspect("busy")["state"] == "crashed", 10, "the crash")
    wait_for(lambda: not any(d.exists() for d in dirs), 5, "the VM's cgroups to go")
    assert helper.wait(timeout=5) == -signal.SIGKILL


def test_limits_not_enforced_are_reported(state_dir: Path) -> None:
    d = Daemon(state_dir, env={"PYVIRT_CGROUP": "none"})
    try:
        info = d.client.info()["cgroups"]
        assert info["enforced"] is False and "PYVIRT_CGROUP" in info["reason"]
        d.client.create("free", memory="64M", command="sleep 1000", cpu_quota=0.5)
        vm = d.client.start("free")
        assert vm["state"] == "running"
        assert vm["limits"]["cpu_quota"] == 0.5 and vm["limits"]["enforced"]["cpu_quota"] is None
        assert "PYVIRT_CGROUP" in vm["limits"]["enforced"]["reason"]
        assert "/pyvirt/" not in Path(f"/proc/{vm['pid']}/cgroup").read_text()
    finally:
        d.cleanup()


def test_console_attach_and_detach(daemon: Daemon) -> None:
    import pty
    c = daemon.client
    c.create("tty", memory="64M")                         # the default guest's interactive shell
    vm = c.start("tty")
    wait_for(lambda: b"# " in Path(vm["paths"]["console_log"]).read_bytes(), 30, "the shell prompt")

    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "pyvirt", "console", "tty",
                                  "--state-dir", str(daemon.state)])
    buf = b""

    def expect(pattern: bytes, timeout: float = 20) -> None:
        nonlocal buf
        deadline = time.monotonic() + timeout
        while not re.search(pattern, buf):
            assert time.monotonic() < deadline, f"no {pattern!r} in {buf[-500:]!r}"
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    buf += os.read(fd, 4096)
                except OSError:
                    break

    try:
        expect(rb"attached to tty")
        wait_for(lambda: c.inspect("tty")["runner"]["console_attached"], 10, "the console client")
        # a second client is turned away while one is attached
        s = socket.socket(socket.AF_UNIX)
        s.connect(vm["paths"]["console_socket"])
        s.settimeout(5)
        assert b"busy" in s.recv(4096)
        s.close()
        os.write(fd, b"echo $((6*7))\r")
        expect(rb"42")
        os.write(fd, b"\x1d")                              # Ctrl-]
        expect(rb"\[detached\]")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    assert c.inspect("tty")["state"] == "running"           # detaching leaves the VM running
    assert "42" in Path(vm["paths"]["console_log"]).read_text()
    wait_for(lambda: not c.inspect("tty")["runner"]["console_attached"], 10, "the detach")


def test_snapshot_through_the_runner_and_restore_in_a_new_runner(daemon: Daemon) -> None:
    """The control request `snapshot` (running, then paused, then with then=quit) and the
    runner's restore hook: a new runner goes on from the snapshot."""
    c = daemon.client
    c.create("orig", memory="64M", command="i=0; while :; do i=$((i+1)); echo n=$i; sleep 0.2; done")
    vm = c.start("orig")
    sock = vm["paths"]["control_socket"]
    wait_for(lambda: "n=5\n" in c.logs("orig")["text"], 30, "the counter")

    def snapshot(d: Path, then: str = "continue") -> None:
        assert control.request(sock, "snapshot", dir=str(d), then=then)["ok"]

    snapshot(daemon.state / "snapshots" / "s1")
    wait_for(lambda: control.request(sock, "status")["snapshot"]["ok"], 30, "snapshot s1")
    assert (daemon.state / "snapshots" / "s1" / "manifest.json").is_file()
    c.pause("orig")
    snapshot(daemon.state / "snapshots" / "s2")                         # taken at once, the VM stays paused
    st = wait_for(lambda: (s := control.request(sock, "status"))["snapshot"]["ok"] and s, 30, "snapshot s2")
    assert st["state"] == "paused" and (daemon.state / "snapshots" / "s2" / "manifest.json").is_file()
    c.resume("orig")
    snapshot(daemon.state / "snapshots" / "s3", then="quit")
    done = wait_for(lambda: (v := c.inspect("orig"))["state"] == "stopped" and v, 30, "the VM to end")
    assert done["reason"] == f"saved to the snapshot {daemon.state / 'snapshots' / 's3'}", done
    last = max(int(n) for n in re.findall(r"n=(\d+)", c.logs("orig")["text"]))

    # The restore hook: a runner whose config.json names the snapshot
    import json
    import subprocess

    from pyvirt.host.paths import vm_paths
    p = vm_paths(daemon.state, "restored0001")
    p.dir.mkdir(parents=True)
    p.config.write_text(json.dumps({"id": "restored0001", "name": "r", "restore": str(daemon.state / "snapshots" / "s3")}))
    runner = subprocess.Popen([sys.executable, "-m", "pyvirt.host.runner", "--id", "restored0001",
                               "--state-dir", str(daemon.state)], start_new_session=True)
    try:
        wait_for(lambda: re.search(rb"n=(\d+)", p.console_log.read_bytes() if p.console_log.exists() else b""),
                 30, "the restored counter")
        first = int(re.search(rb"n=(\d+)", p.console_log.read_bytes()).group(1))
        assert last <= first <= last + 2                     # it went on where it stopped
        assert control.request(p.control_sock, "stop")["ok"]   # the agent of the restored guest
        assert runner.wait(timeout=20) == 0
        assert json.loads(p.exit_file.read_text())["reason"] == "poweroff"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
