"""Networking in the default guest, end to end over loopback only: guest -> host through
passt's gateway address, host -> guest through forwarded ports, a -netdev stream socket,
and the one-line errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pyvirt.testing import stretch
from pyvirt.testing.guest import GATEWAY, pyvirt

pytestmark = pytest.mark.slow
needs_passt = pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def with_address(net: str, command: str, engine: str | None = None):  # noqa: ANN201
    """`pyvirt run --net NET` running `command` once eth0 has its address (exit status 0)."""
    r = pyvirt("run", "--net", net, *(["--engine", engine] if engine else []), "--command",
               f"ip -4 addr show eth0 | grep -q 'inet ' || exit 9; {command}", timeout=600)
    assert r.code == 0, (r.out, r.err)
    return r


@needs_passt
def test_guest_reaches_host_loopback(default_image, host_server, every_engine: str) -> None:
    www, port = host_server
    content = os.urandom(200_000)
    (www / "file").write_bytes(content)
    (www / "small").write_text("hello from the host\n")
    r = with_address("user,host-loopback=on", f"wget -q -O - http://{GATEWAY}:{port}/small && "
                     f"wget -q -O /tmp/f http://{GATEWAY}:{port}/file && md5sum /tmp/f", every_engine)
    assert r.out == f"hello from the host\n{hashlib.md5(content).hexdigest()}  /tmp/f\n"


@needs_passt
def test_guest_does_not_reach_host_loopback_by_default(default_image, host_server) -> None:
    """Without host-loopback=on (issue 14, item 4) passt runs with --no-map-gw: the gateway
    address is the real gateway, not the host's 127.0.0.1, and the listener there is not reached."""
    www, port = host_server
    (www / "small").write_text("hello from the host\n")
    r = with_address("user", f"wget -q -T 3 -O - http://{GATEWAY}:{port}/small; echo wget=$?; "
                     f"wget -q -T 3 -O - http://127.0.0.1:{port}/small; echo local=$?")
    assert "hello from the host" not in r.out, r.out
    assert "wget=0" not in r.out and "local=0" not in r.out, r.out


@needs_passt
def test_host_reaches_guest_through_forwarded_ports(default_image) -> None:
    page, done = free_port(), free_port()
    cmd = ("mkdir -p /www && echo 'served by the guest' > /www/index.html && httpd -p 80 -h /www && "
           "nc -l -p 81 </dev/null >/dev/null; echo bye")
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--port", f"{page}:80",
                          "--port", f"{done}:81", "--timeout", str(int(stretch(240))), "--command", cmd],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        body = b""
        deadline = time.monotonic() + stretch(180)
        while time.monotonic() < deadline:
            assert p.poll() is None, p.communicate()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{page}/index.html", timeout=10) as resp:
                    body = resp.read()
                break
            except OSError:                      # not up yet: passt resets the connection
                time.sleep(0.5)
        assert body == b"served by the guest\n"
        # Now tell the guest to finish: one connection to its nc on port 81.
        while time.monotonic() < deadline and p.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", done), timeout=5).close()
            except OSError:
                pass
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out == b"bye\n"
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_stream_socket_carries_the_guests_frames(default_image, tmp_path: Path) -> None:
    """--net stream=SOCKET: the guest's DHCP discovery arrives framed, from the MAC we gave."""
    path = tmp_path / "net.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    frames: list[bytes] = []

    def collect() -> None:
        conn, _ = server.accept()
        buf = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                    n = struct.unpack(">I", buf[:4])[0]
                    frames.append(buf[4:4 + n])
                    buf = buf[4 + n:]

    t = threading.Thread(target=collect, daemon=True)
    t.start()
    try:
        r = pyvirt("run", "--net", f"stream={path},mac=52:54:00:ab:cd:ef", "--command",
                   "cat /sys/class/net/eth0/address", timeout=300)
    finally:
        server.close()
    t.join(10)
    assert r.code == 0, r.err
    assert r.out == "52:54:00:ab:cd:ef\n"
    mac = bytes.fromhex("525400abcdef")
    dhcp = [f for f in frames if f[6:12] == mac and f[12:14] == b"\x08\x00" and f[23] == 17
            and f[36:38] == b"\x00\x43"]           # IPv4, UDP, to port 67
    assert dhcp, f"no DHCP frame among {len(frames)} frames"


@needs_passt
def test_forwarded_port_in_use_is_one_line_error(default_image) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        r = pyvirt("run", "--port", f"{port}:80", "--command", "true", timeout=120)
    finally:
        busy.close()
    assert r.code == 1
    assert r.err == f"pyvirt: error: host port {port} on 127.0.0.1 is already in use\n"


@pytest.mark.parametrize("args, message", [
    (["--net", "wifi"], "--net wifi: expected user"),
    (["--net", "tap=t0", "--port", "8080:80"], "--port needs a user network"),
    (["--port", "80"], "--port 80: expected HOST:GUEST"),
    (["--net", "stream=/nonexistent/sock"], "cannot connect to network socket /nonexistent/sock"),
])
def test_bad_network_flags(default_image, args: list[str], message: str) -> None:
    r = pyvirt("run", *args, "--command", "true", timeout=120)
    assert r.code == 1
    assert r.err.startswith("pyvirt: error: ") and message in r.err and r.err.count("\n") == 1
