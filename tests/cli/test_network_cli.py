"""`pyvirt network create/ls/rm`: the switch processes they start and stop, and how they fail."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.errors import ConfigError
from pyvirt.network import list_networks, network_socket
from pyvirt.spec import NetSpec
from pyvirt.testing.cli import one_line_error, run, runtime_dir


@pytest.fixture
def runtime() -> Iterator[Path]:
    with runtime_dir() as d:
        yield d


def gone(pid: int | None) -> bool:
    """Whether process `pid` has ended (here it stays a zombie: pytest is its parent)."""
    assert pid is not None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def connect(path: str | Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(5)
    return s


def recv_frame(s: socket.socket) -> bytes:
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        data = s.recv(65536)
        assert data
        buf += data
    return buf[4:]


def test_create_ls_rm(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "network", "create", "lan")
    sock = runtime / "networks" / "lan.sock"
    assert code == 0 and out == f"{sock}\n"
    assert oct((runtime / "networks").stat().st_mode & 0o777) == "0o700"
    state = list_networks()
    assert [(n.name, n.alive, n.socket) for n in state] == [("lan", True, sock)]
    assert network_socket("lan") == sock
    # frames flow between two ports of the running switch
    a, b = connect(sock), connect(sock)
    f = b"\xff" * 6 + bytes.fromhex("525400000001") + b"\x88\xb5hi"
    a.sendall(struct.pack(">I", len(f)) + f)
    assert recv_frame(b) == f
    deadline = time.monotonic() + 5
    while list_networks()[0].ports != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    code, out, _ = run(capsys, "network", "ls")
    assert code == 0
    assert out.splitlines()[1].split() == ["lan", "yes", "2", str(sock)]
    a.close()
    b.close()
    pid = list_networks()[0].pid
    assert run(capsys, "network", "rm", "lan")[:2] == (0, "lan removed\n")
    assert not sock.exists() and list_networks() == []
    assert gone(pid)
    one_line_error(run(capsys, "network", "rm", "lan"), "no network named lan")


def test_duplicate_create_is_an_error(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "network", "create", "dup")[0] == 0
    one_line_error(run(capsys, "network", "create", "dup"), "network dup already exists")
    assert [n.alive for n in list_networks()] == [True]


@pytest.mark.parametrize("name", ["", "a b", "x" * 33, "../etc", "a.b"])
def test_invalid_names(runtime: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    one_line_error(run(capsys, "network", "create", name), "invalid network name")


def test_ls_header_and_json(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "network", "ls")[:2] == (0, "NAME  ALIVE  PORTS  SOCKET\n")    # even when empty
    assert run(capsys, "network", "ls", "--json")[:2] == (0, "[]\n")
    assert run(capsys, "network", "create", "j1")[0] == 0
    code, out, _ = run(capsys, "network", "ls", "--json")
    (net,) = json.loads(out)
    assert code == 0 and net["name"] == "j1" and net["alive"] is True and net["socket"].endswith("j1.sock")


def test_rm_unknown(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(run(capsys, "network", "rm", "nothere"), "no network named nothere")


def test_dead_switch(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A switch killed with SIGKILL: not alive, not joinable, and its name can be made again."""
    assert run(capsys, "network", "create", "gone")[0] == 0
    pid = list_networks()[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while list_networks()[0].alive and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(n.name, n.alive) for n in list_networks()] == [("gone", False)]
    with pytest.raises(ConfigError, match=r"network gone is not alive .*`pyvirt network create gone`"):
        network_socket("gone")
    assert run(capsys, "network", "create", "gone")[0] == 0
    assert list_networks()[0].alive


def test_networks_are_separate_switches(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "network", "create", "one")[0] == 0
    assert run(capsys, "network", "create", "two")[0] == 0
    nets = {n.name: n for n in list_networks()}
    assert nets["one"].pid != nets["two"].pid and nets["one"].socket != nets["two"].socket
    a1, b1 = connect(nets["one"].socket), connect(nets["one"].socket)
    a2 = connect(nets["two"].socket)
    f = b"\xff" * 6 + bytes.fromhex("525400000001") + b"\x88\xb5one"
    a1.sendall(struct.pack(">I", len(f)) + f)
    assert recv_frame(b1) == f
    a2.settimeout(0.3)
    with pytest.raises(socket.timeout):
        a2.recv(1)
    for s in (a1, b1, a2):
        s.close()


def test_net_spec_network() -> None:
    n = NetSpec.parse("network=lan,mac=52:54:00:00:00:05")
    assert (n.backend, n.network, n.mac) == ("network", "lan", "52:54:00:00:00:05")
    with pytest.raises(ConfigError, match="expected user"):
        NetSpec.parse("network=")


def test_runtime_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pyvirt.network.manage import runtime_dir
    monkeypatch.delenv("PYVIRT_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert runtime_dir() == tmp_path / "pyvirt"
    assert (tmp_path / "pyvirt").stat().st_mode & 0o777 == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_dir() == Path(f"/tmp/pyvirt-{os.getuid()}")
