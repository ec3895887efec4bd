"""The default guest as a new user meets it (issue 18): `--command` as a shell pipe (item 3),
`--vport` data sent before the guest opens the port and /dev/virtio-ports links (item 5),
`poweroff` and `reboot` at the shell prompt (item 8)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirt.testing.guest import PtyConsole, pyvirt

pytestmark = pytest.mark.slow


def test_command_is_a_shell_pipe(default_image) -> None:
    r = pyvirt("run", "--command", "read x; echo $x; echo err >&2; exit 4", stdin=b"hi\n", timeout=300)
    assert (r.code, r.out, r.err) == (4, "hi\n", "err\n")


def test_command_stdin_to_its_end(default_image) -> None:
    data = os.urandom(200_000)
    r = pyvirt("run", "--command", "wc -c; echo done", stdin=data, timeout=300)
    assert r.code == 0 and r.out.split() == ["200000", "done"], r.err
    r = pyvirt("run", "--command", "md5sum | cut -d' ' -f1", stdin=data, timeout=300)
    assert r.out.strip() == hashlib.md5(data).hexdigest(), r.err


def test_long_command_and_big_output(default_image) -> None:
    command = "x=0; " + "x=$((x+1)); " * 1000 + "echo $x; head -c 1000000 /dev/zero | tr '\\0' a"
    assert len(command) > 10_000
    r = pyvirt("run", "--command", command, timeout=300)
    assert r.code == 0, r.err
    assert r.out.startswith("1000\n") and r.out[5:] == "a" * 1_000_000


def test_command_output_closed_ends_the_vm(default_image) -> None:
    """`pyvirt run --command yes | head -1`: the reader goes away, the VM ends (exit 1)."""
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--command", "yes"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"y\n"
        p.stdout.close()
        assert p.wait(60) == 1
    finally:
        p.kill()
        p.wait()


def test_vport_data_sent_before_the_guest_opens_it(default_image, tmp_path: Path) -> None:
    """The host writes and leaves before the guest looks: the guest reads the data, then
    end-of-file (not EOF at once); its write afterwards is kept for the next client (no hang)."""
    sock = tmp_path / "data.sock"
    cmd = ("readlink /dev/virtio-ports/data; read go; cat /dev/virtio-ports/data; echo read-done; "
           "echo written-later > /dev/virtio-ports/data; echo write-done; read go; true")
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--vport", f"data={sock}", "--command", cmd],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"../vport1p1\n"        # the guest is up, the port not opened
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(sock))
        c.sendall(b"early bird\n")
        c.close()
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"early bird\n"
        assert p.stdout.readline() == b"read-done\n"          # EOF after the data
        assert p.stdout.readline() == b"write-done\n"         # the write did not block
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(sock))
        c.settimeout(60)
        assert c.recv(100) == b"written-later\n"              # kept for the next client
        c.close()
        p.stdin.close()
        assert p.wait(60) == 0, p.stderr.read()
    finally:
        p.kill()
        p.wait()


def test_poweroff_and_reboot_at_the_prompt(default_image) -> None:
    vm = PtyConsole(timeout=300)
    try:
        vm.expect(rb"root@pyvirt:[^\r\n]*# ")
        vm.buf = b""
        vm.send(b"reboot\r")
        vm.expect(rb"Ctrl-A x quits")               # the banner of the next boot
        vm.expect(rb"root@pyvirt:[^\r\n]*# ")
        vm.send(b"poweroff\r")
        assert vm.wait_exit(60) == 0, f"poweroff did not end the VM: {vm.buf[-500:]!r}"
    finally:
        vm.kill()
