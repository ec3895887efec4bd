"""The guest agent through pyvirtd: `pyvirt exec` (exit statuses, streams apart and in order,
stdin, a TTY), 20 concurrent execs, `pyvirt cp` of 100 MiB both ways, one-line errors, and a
restored VM and 4 clones that answer exec at once with their own host name and the host's
clock."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyvirt.host.agent import AgentError
from pyvirt.testing.daemon import Daemon, wait_for

MIB = 1 << 20


def running(daemon: Daemon, name: str = "vm", memory: str = "512M") -> None:
    c = daemon.client
    c.create(name, memory=memory, command="sleep 100000")
    c.start(name)

    def answers() -> bool:
        try:
            return c.run(name, ["true"])[0] == 0
        except AgentError:
            return False
    wait_for(answers, 120, "the guest agent", interval=0.5)


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
    assert all(v < 1.0 for v in took.values()), took
