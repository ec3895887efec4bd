"""A socket path that comes from a file someone else made (a foreign snapshot's console
port, say the system bus) is never unlinked and served to the guest while something listens
on it; only a stale socket is replaced (issue 14)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pyvirt.devices.virtio.console import UnixSocketPort
from pyvirt.errors import ConfigError
from pyvirt.fsutil import listen_unix


def test_a_live_host_socket_is_never_taken_over(tmp_path: Path) -> None:
    p = tmp_path / "bus.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(p))
    srv.listen()
    ino = os.stat(p).st_ino
    with pytest.raises(ConfigError, match="in use"):
        UnixSocketPort(p)
    with pytest.raises(ConfigError, match="in use"):
        listen_unix(p)
    assert os.stat(p).st_ino == ino                     # still the service's socket
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(p))
    c.close()
    srv.close()                                         # now stale: replaced
    port = UnixSocketPort(p)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(p))                                   # the port's own now
    c.close()
    port.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        listen_unix(tmp_path / "file")
