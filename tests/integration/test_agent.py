"""The guest agent on a booted default guest, over virtio-vsock (`pyvirt run --vsock`):
streaming exec with separate stdout/stderr, stdin, exit statuses and signals, a TTY's
window size, concurrent execs, file copies both ways, listening ports, clock and host
name, and a hostile vsock peer in the guest that cannot hurt the VMM."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from pyvirt.host.agent import Agent, AgentError
from pyvirt.testing import stretch

pytestmark = pytest.mark.usefixtures("default_image")
_VMM_PID = [0]


def _end(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    proc.terminate()                                      # SIGTERM: the VMM cleans up
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    proc.kill()                                           # (nothing if it has ended)
    proc.wait()
    log.close()


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    d = tmp_path_factory.mktemp("agent")
    sock = d / "vsock.sock"
    log = open(d / "vm.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--vsock", str(sock), "--memory", "512M",
                             "--command", "sleep 100000"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        agent = Agent(sock)
        deadline = time.monotonic() + stretch(120)
        while not sock.exists():
            assert proc.poll() is None, (d / "vm.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        agent.wait(timeout=stretch(120))
        _VMM_PID[0] = proc.pid
        yield agent
    finally:
        _end(proc, log)


def test_exec_streams_stdout_and_stderr_apart_while_running(guest: Agent) -> None:
    s = guest.exec(["sh", "-c", "echo first; echo oops >&2; read line; echo second; exit 3"], stdin=True)
    try:
        events = s.events()
        ev = next(events)
        assert (ev.stream, ev.data) == (1, b"first\n")       # before the command has ended
        ev = next(events)
        assert (ev.stream, ev.data) == (2, b"oops\n")
        s.write(b"go\n")
        rest = list(events)
        assert b"".join(e.data for e in rest if e.stream == 1) == b"second\n"
        assert rest[-1].stream == 0 and rest[-1].status == 3
    finally:
        s.close()


@pytest.mark.parametrize(("cmd", "status"), [("exit 0", 0), ("exit 3", 3), ("kill -9 $$", 128 + 9),
                                             ("kill -TERM $$", 128 + 15)])
def test_exit_status_exact(guest: Agent, cmd: str, status: int) -> None:
    assert guest.run(["sh", "-c", cmd])[0] == status


def test_stdin_is_passed(guest: Agent) -> None:
    data = os.urandom(300_000)
    code, out, _ = guest.run(["sha256sum"], input=data)
    assert code == 0 and out.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_missing_command_is_127(guest: Agent) -> None:
    code, _, err = guest.run(["/no/such/program"])
    assert code == 127 and b"No such file" in err


def test_tty_has_the_window_size(guest: Agent) -> None:
    s = guest.exec(["stty", "size"], tty=True, size=(37, 123))
    try:
        out = b"".join(e.data for e in s.events() if e.stream == 1)
        assert out.strip() == b"37 123" and s.result is not None and s.result.status == 0
    finally:
        s.close()


def test_twenty_concurrent_execs(guest: Agent) -> None:
    results: dict[int, tuple[int, bytes, bytes]] = {}

    def one(i: int) -> None:
        results[i] = guest.run(["sh", "-c", f"sleep 1; echo n{i}"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(20))
    assert all(results[i] == (0, f"n{i}\n".encode(), b"") for i in range(20))


def test_copy_both_ways_with_checksums_and_modes(guest: Agent, tmp_path: Path) -> None:
    src = tmp_path / "big"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    os.chmod(src, 0o751)
    assert guest.write_file(src, "/tmp/big") == 100 << 20
    code, out, _ = guest.run(["sh", "-c", "sha256sum /tmp/big; stat -c %a /tmp/big"])
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert code == 0 and out.split() == [digest.encode(), b"/tmp/big", b"751"]
    back = tmp_path / "back"
    assert guest.read_file("/tmp/big", back) == 100 << 20
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert stat.S_IMODE(back.stat().st_mode) == 0o751
    guest.run(["rm", "/tmp/big"])


def test_copy_errors_are_one_line(guest: Agent, tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot open /no/such: No such file") as e:
        guest.read_file("/no/such", tmp_path / "x")
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
    src = tmp_path / "f"
    src.write_bytes(b"x" * (2 << 20))
    # a full disk: a 1 MiB tmpfs in the guest
    assert guest.run(["sh", "-c", "mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small"])[0] == 0
    with pytest.raises(AgentError, match="No space left on device") as e:
        guest.write_file(src, "/mnt/small/f")
    assert "\n" not in str(e.value)
    assert guest.run(["ls", "-A", "/mnt/small"])[1] == b""      # the partial copy is gone


def test_listening_ports_clock_and_hostname(guest: Agent) -> None:
    s = guest.exec(["nc", "-l", "-p", "4567"])
    try:
        deadline = time.monotonic() + stretch(20)
        while 4567 not in guest.listening_ports():
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        s.kill(9)
        s.close()
    guest.set_clock(1_000_000_000.5)
    out = guest.run(["date", "+%s"])[1]
    assert abs(int(out) - 1_000_000_000) <= 2
    guest.set_clock()
    assert abs(int(guest.run(["date", "+%s"])[1]) - time.time()) <= 2
    guest.set_hostname("agent-test")
    assert guest.run(["hostname"])[1] == b"agent-test\n"
    with pytest.raises(AgentError, match="sethostname"):
        guest.set_hostname("x" * 65)


FLOOD_C = r"""
#include <sys/socket.h>
#include <linux/vm_sockets.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
/* open N connections to host port P and write into all of them without end */
int main(int argc, char **argv) {
    int n = atoi(argv[1]), port = atoi(argv[2]), fds[512], open_ = 0;
    static char junk[65536];
    memset(junk, 'j', sizeof junk);
    for (int i = 0; i < n && i < 512; i++) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = port};
        if (s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0) {
            fcntl(s, F_SETFL, O_NONBLOCK);
            fds[open_++] = s;
        } else if (s >= 0) close(s);
    }
    printf("%d\n", open_);
    fflush(stdout);
    for (int round = 0; round < 200; round++)
        for (int i = 0; i < open_; i++) write(fds[i], junk, sizeof junk);
    return 0;
}
"""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_hostile_vsock_peer_in_the_guest(guest: Agent, tmp_path: Path) -> None:
    """A guest program opens 200 vsock connections to a host port whose listener never
    reads, and writes into them without end: the VMM takes at most 64 connections and
    256 KiB each, its memory stays bounded, and the agent still answers."""
    import socket as socketmod
    src = tmp_path / "flood.c"
    src.write_text(FLOOD_C.replace("#include <stdio.h>", "#include <stdio.h>\n#include <stdlib.h>"))
    exe = tmp_path / "flood"
    subprocess.run(["riscv64-linux-gnu-gcc", "-static", "-Os", "-o", str(exe), str(src)], check=True)
    vmm = _VMM_PID[0]
    listener = socketmod.socket(socketmod.AF_UNIX)
    listener.bind(f"{guest.path}_5000")
    listener.listen(512)
    try:
        before = _rss_kib(vmm)
        guest.write_file(exe, "/tmp/flood")
        code, out, _ = guest.run(["/tmp/flood", "200", "5000"])
        assert code == 0 and 0 < int(out) <= 64         # MAX_GUEST_CONNECTIONS
        assert _rss_kib(vmm) - before < 48 * 1024        # 64 x 256 KiB buffered at most, plus slack
        assert guest.run(["echo", "alive"])[1] == b"alive\n"
    finally:
        listener.close()
        os.unlink(f"{guest.path}_5000")


def test_agent_on_the_debian_guest(tmp_path: Path) -> None:
    """The Debian image's pyvirt-agent.service: exec with separate streams and the exact
    status, a TTY's window size.  (Booting Debian takes minutes on a loaded machine.)"""
    from pyvirt.images.debian_image import cached_debian_image
    if cached_debian_image() is None:
        pytest.fail("the Debian image is not built: run `pyvirt image build debian` first")
    sock = tmp_path / "vsock.sock"
    log = open(tmp_path / "vm.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--image", "debian", "--vsock", str(sock),
                             "--command", "sleep 100000"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        agent = Agent(sock)
        deadline = time.monotonic() + stretch(600)
        while True:
            try:
                agent.wait(5)
                break
            except AgentError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "vm.log").read_text()
        assert agent.run(["sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, b"out\n", b"err\n")
        s = agent.exec(["stty", "size"], tty=True, size=(33, 77))
        assert b"".join(e.data for e in s.events()).strip() == b"33 77" and s.result is not None
        s.close()
    finally:
        _end(proc, log)
