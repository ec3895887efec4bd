"""The guest agent through pyvirtd: `pyvirt exec` (exit statuses, streams apart and in order,
stdin, a TTY), 20 concurrent execs, `pyvirt cp` of 100 MiB both ways, one-line errors, and a
restored VM and 4 clones that answer exec at once with their own host name and the host's
clock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pty
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from pyvirt.testing import stretch
from pyvirt.testing.daemon import Daemon, wait_agent, wait_for

MIB = 1 << 20


def running(daemon: Daemon, name: str = "vm", memory: str = "512M") -> None:
    c = daemon.client
    c.create(name, memory=memory, command="sleep 100000")
    c.start(name)
    wait_agent(c, name)


def exec_cli(daemon: Daemon, vm: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    """`pyvirt exec --state-dir S VM -- CMD...` (everything after `--` is the command's)."""
    return subprocess.run([sys.executable, "-m", "pyvirt", "exec", "--state-dir", str(daemon.state), vm, "--", *cmd],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_exec_through_the_daemon(daemon: Daemon) -> None:
    running(daemon)
    c = daemon.client
    s = c.exec("vm", ["sh", "-c", "echo one; echo two >&2; read x; echo got $x; exit 3"], stdin=True)
    ev = s.events()
    first = next(ev)
    assert (first.stream, first.data) == (1, b"one\n")          # while the command waits for stdin
    second = next(ev)
    assert (second.stream, second.data) == (2, b"two\n")
    s.write(b"it\n")
    rest = list(ev)
    assert b"".join(e.data for e in rest if e.stream == 1) == b"got it\n" and rest[-1].status == 3
    s.close()
    assert c.run("vm", ["sh", "-c", "kill -9 $$"])[0] == 137
    s = c.exec("vm", ["stty", "size"], tty=True, size=(41, 99))
    assert b"".join(e.data for e in s.events()).strip() == b"41 99"
    s.close()

    r = exec_cli(daemon, "vm", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = exec_cli(daemon, "vm", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15
    r = exec_cli(daemon, "nosuchvm", "true")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1

    results: dict[int, tuple[int, bytes, bytes]] = {}

    def one(i: int) -> None:
        results[i] = c.run("vm", ["sh", "-c", f"sleep 1; echo {i}"])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results.get(i) == (0, f"{i}\n".encode(), b"") for i in range(20)), results


def test_cp_both_ways(daemon: Daemon, tmp_path: Path) -> None:
    running(daemon)
    src = tmp_path / "big"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(MIB))
    os.chmod(src, 0o640)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    r = daemon.cli("cp", str(src), "vm:/tmp/big", timeout=600)
    assert r.returncode == 0, r.stderr
    code, out, _ = daemon.client.run("vm", ["sh", "-c", "sha256sum /tmp/big; stat -c %a /tmp/big"])
    assert out.split() == [digest.encode(), b"/tmp/big", b"640"]
    back = tmp_path / "back"
    back.mkdir()
    r = daemon.cli("cp", "vm:/tmp/big", str(back), timeout=600)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((back / "big").read_bytes()).hexdigest() == digest
    assert stat.S_IMODE((back / "big").stat().st_mode) == 0o640
    r = daemon.cli("cp", "vm:/no/such/file", str(back))
    assert r.returncode != 0 and "No such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    daemon.client.run("vm", ["sh", "-c", "mkdir -p /mnt/s && mount -t tmpfs -o size=1m tmpfs /mnt/s"])
    r = daemon.cli("cp", str(src), "vm:/mnt/s/big", timeout=600)
    assert r.returncode != 0 and "No space left" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(back)) == ["big"]


def test_restored_and_cloned_vms_answer_at_once(daemon: Daemon) -> None:
    running(daemon, "base", memory="256M")
    c = daemon.client
    c.snapshot("base", "gold")
    time.sleep(3)                                           # the snapshot's clock falls behind
    c.kill("base")

    def check(name: str) -> float:
        """The first exec answers (no retry) with the VM's own host name; how long it took.
        The guest's clock is the host's."""
        t0 = time.monotonic()
        assert c.run(name, ["hostname"]) == (0, f"{name}\n".encode(), b"")
        took = time.monotonic() - t0
        # (busybox date has no %N; its adjtimex prints the time to the microsecond)
        before = time.time()
        code, out, _ = c.run(name, ["sh", "-c", "busybox adjtimex | awk '/tv_(u?sec)/ {print $2}'"])
        after = time.time()
        sec, usec = out.split()
        when = int(sec) + int(usec) / 1e6                # read between `before` and `after`
        assert code == 0 and before - 1.0 < when < after + 1.0, (name, when - before, after - when)
        return took

    took = {"back": check(c.restore("gold", name="back")["name"])}
    clones = c.clone("gold", 4, prefix="cl")
    took.update({vm["name"]: check(vm["name"]) for vm in clones})
    print("exec after restore:", {k: round(v, 2) for k, v in took.items()})
    # The acceptance point is 1 s; bench/restore_exec.py measures it (BENCHMARKS.md).  Here,
    # beside other tests on a shared machine, the bound has slack: no retry loop, no wait for
    # a slow agent, an answer in seconds, not the 10 s after_restore would wait.
    assert all(v < stretch(3.0) for v in took.values()), took


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    """What the terminal at `fd` printed, up to and including `needle` (AssertionError after
    `timeout` s or at its end)."""
    got = b""
    deadline = time.monotonic() + timeout
    while needle not in got:
        left = deadline - time.monotonic()
        assert left > 0, got[-500:]
        if select.select([fd], [], [], left)[0]:
            try:
                data = os.read(fd, 4096)
            except OSError:                   # EIO: the other side has closed
                data = b""
            assert data, got[-500:]
            got += data
    return got


def test_shell_runs_on_a_terminal_of_the_hosts_size(daemon: Daemon) -> None:
    """`pyvirt shell VM` on a terminal: the guest's TTY has the host terminal's size, and
    follows it when it changes (SIGWINCH); `exit` ends it with the shell's status."""
    running(daemon)
    pid, fd = pty.fork()
    if pid == 0:                                        # the child: pyvirt shell on the pty
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 37, 111, 0, 0))
        os.execv(sys.executable, [sys.executable, "-m", "pyvirt", "shell", "--state-dir", str(daemon.state), "vm"])
    try:
        _read_until(fd, b"# ", 60)          # the prompt (typed ahead, input would be flushed by raw mode)
        os.write(fd, b"stty size; echo MARK$((6*7))\n")
        out = _read_until(fd, b"MARK42", 60)
        assert re.search(rb"(^|\n)37 111\r?\n", out), out
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))   # the host resizes
        time.sleep(0.5)
        os.write(fd, b"stty size; echo MARK$((6*8))\n")
        out = _read_until(fd, b"MARK48", 60)
        assert re.search(rb"(^|\n)50 132\r?\n", out), out
        os.write(fd, b"exit 5\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 5
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_port_forwarding_and_the_tcp_websocket(daemon: Daemon) -> None:
    """`pyvirt port VM HOST:GUEST` forwards a host TCP port to the guest's: bytes both ways,
    until Ctrl-C; the WebSocket under it (`Client.tcp`) carries a guest port's
    stream, and a closed guest port is a one-line close reason."""
    from websockets.exceptions import ConnectionClosed
    running(daemon)
    c = daemon.client
    # (nc's input stays open: busybox nc ends at its input's end, before the peer has written)
    servers = [c.exec("vm", ["sh", "-c", f"(echo hello-{p}; sleep 60) | nc -l -p {p}"]) for p in (8080, 8082)]
    wait_for(lambda: {8080, 8082} <= set(c.guest_ports("vm")), 30, "the guest's listeners")

    # The WebSocket itself.
    ws = c.tcp("vm", 8082)
    assert ws.recv(timeout=30) == b"hello-8082\n"
    ws.send(b"over the websocket\n")
    ev = next(servers[1].events())
    assert (ev.stream, ev.data) == (1, b"over the websocket\n")
    ws.close()
    ws = c.tcp("vm", 9)                                   # nothing listens there
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    reason = closed.value.rcvd.reason if closed.value.rcvd else ""
    assert closed.value.rcvd and closed.value.rcvd.code == 4000 and "refused" in reason.lower(), reason
    ws.close()

    # pyvirt port.
    hport = _free_port()
    fwd = subprocess.Popen([sys.executable, "-m", "pyvirt", "port", "--state-dir", str(daemon.state), "vm",
                            f"{hport}:8080"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        def connected() -> socket.socket | None:
            with contextlib.suppress(OSError):
                return socket.create_connection(("127.0.0.1", hport), timeout=30)
            return None
        a = wait_for(connected, 30, "the forwarder")
        assert a.makefile("rb").readline() == b"hello-8080\n"
        a.sendall(b"through pyvirt port\n")
        ev = next(servers[0].events())
        assert (ev.stream, ev.data) == (1, b"through pyvirt port\n")
        a.close()
        fwd.send_signal(signal.SIGINT)
        _, err = fwd.communicate(timeout=30)
        assert fwd.returncode == 0, err
        assert f"forwarding 127.0.0.1:{hport} -> vm:8080" in err.decode()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", hport), timeout=5)
    finally:
        if fwd.poll() is None:
            fwd.kill()
            fwd.wait()
        for s in servers:
            s.close()
    r = daemon.cli("port", "vm", "70000:80")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
