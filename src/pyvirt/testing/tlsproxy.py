"""A TLS end of a migration in its own process, for benchmarks and tests without pyvirtd:
what pyvirtd's relay does (host/tls.py), between a Unix socket and TCP.

    python -m pyvirt.testing.tlsproxy server CREDS tcp:HOST:PORT UNIX_PATH
        accepts one TCP connection (TLS, the client's certificate checked) and relays it to
        the migration destination listening at UNIX_PATH
    python -m pyvirt.testing.tlsproxy client CREDS UNIX_PATH tcp:HOST:PORT
        accepts one connection on UNIX_PATH (a migration source) and relays it over TLS to
        HOST:PORT (its certificate checked for HOST)

Each prints `listening [PORT]` once it listens (the TCP port it took, for port 0), then ends
with the relay."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from pyvirt.host.tls import Creds, TlsError


def _tcp(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    return host, int(port)


def serve(side: str, creds_dir: str, listen: str, target: str) -> int:
    creds = Creds(creds_dir)
    if side == "server":
        listener = socket.create_server(_tcp(listen))
        print(f"listening {listener.getsockname()[1]}", flush=True)
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(listen)
        listener.listen(1)
        print("listening", flush=True)
    conn, _ = listener.accept()
    listener.close()
    try:
        if side == "server":
            inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            inner.connect(target)
            relay = creds.accept(conn, inner=inner)
        else:
            host, port = _tcp(target)
            relay = creds.connect(socket.create_connection((host, port)), host, inner=conn)
    except (TlsError, OSError) as e:
        print(f"tlsproxy: {e}", file=sys.stderr, flush=True)
        return 3
    relay.join()
    return 0 if relay.error is None else 3


def start(side: str, creds: Path, listen: str, target: str) -> tuple[subprocess.Popen[str], str]:
    """The proxy process and the address it listens on (tcp:HOST:THE_PORT for a server)."""
    p = subprocess.Popen([sys.executable, "-m", "pyvirt.testing.tlsproxy", side, str(creds), listen, target],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    words = p.stdout.readline().split()
    if not words or words[0] != "listening":
        p.kill()
        raise RuntimeError(f"the TLS {side} proxy did not start")
    return p, f"{listen.rpartition(':')[0]}:{words[1]}" if side == "server" else listen


if __name__ == "__main__":
    sys.exit(serve(*sys.argv[1:5]))
