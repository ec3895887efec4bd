"""pyvirtd: the hypervisor service.

    python -m pyvirt.host.daemon [--state-dir DIR]      # in the foreground
    pyvirt daemon [--state-dir DIR] [--foreground]      # in the background unless --foreground

It holds <state>/pyvirtd.lock (one daemon per state directory), serves the
REST API on <state>/pyvirtd.sock (mode 0600) and watches the VM runners.
SIGTERM or SIGINT ends the daemon, not the VMs: a restarted daemon finds the
running ones again.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pyvirt.errors import ConfigError, PyvirtError
from pyvirt.fsutil import listen_unix
from pyvirt.host.paths import api_socket, state_dir

START_TIMEOUT = 15.0


def _lock(state: Path) -> int:
    fd = os.open(state / "pyvirtd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        pid = (state / "pyvirtd.lock").read_text().strip() or "?"
        raise ConfigError(f"pyvirtd is already running for {state} (pid {pid})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def serve(state: Path, jail: bool | None = None, tls_creds: str | None = None) -> None:
    """Run the daemon in this process until SIGTERM/SIGINT.  `tls_creds`: a directory of x509
    credentials (host/tls.py): migrations over TCP use TLS."""
    import uvicorn

    from pyvirt.host.api import make_app
    from pyvirt.host.manager import Manager
    from pyvirt.host.tls import Creds

    tls = Creds(tls_creds) if tls_creds else None      # (a bad directory: one line, before anything starts)

    os.umask(0o077)                      # the database, logs and sockets are the user's alone
    lock_fd = _lock(state)
    handler = logging.StreamHandler(sys.stderr)     # the terminal, or pyvirtd.log in the background
    handler.setFormatter(logging.Formatter("%(asctime)s pyvirtd[%(process)d]: %(message)s"))
    log = logging.getLogger("pyvirtd")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    sock_path = api_socket(state)
    manager = Manager(state, jail=jail, tls=tls)
    sock = listen_unix(sock_path, backlog=64)
    try:
        config = uvicorn.Config(make_app(manager), log_level="warning", access_log=False, lifespan="off")
        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the
        # handler it found: with these, that ends in the clean-up below and exit status 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        log.info("listening on %s%s", sock_path, f"; migrations over TCP use TLS ({tls.dir})" if tls else "")
        uvicorn.Server(config).run(sockets=[sock])
        log.info("stopping (the VMs go on running)")
    finally:
        manager.close()
        sock.close()
        with contextlib.suppress(OSError):
            sock_path.unlink()
        os.close(lock_fd)


def running(state: Path) -> bool:
    """Whether a daemon answers on the state directory's socket."""
    from pyvirt.host.client import Client
    try:
        Client(state_dir=state, timeout=2).info()
        return True
    except PyvirtError:
        return False


def start_background(state: Path, tls_creds: str | None = None) -> Path:
    """Start the daemon detached from this terminal (its messages go to pyvirtd.log); the API
    socket once it answers.  `tls_creds`: as `pyvirtd --tls-creds`."""
    if running(state):
        raise ConfigError(f"pyvirtd is already running for {state}")
    log_path = state / "pyvirtd.log"
    with open(log_path, "ab") as log:
        tls = ["--tls-creds", str(Path(tls_creds).absolute())] if tls_creds else []
        proc = subprocess.Popen([sys.executable, "-m", "pyvirt.host.daemon", "--state-dir", str(state), *tls],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not running(state):
        if proc.poll() is not None:
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
            raise ConfigError(f"pyvirtd did not start: {lines[-1] if lines else proc.returncode}")
        if time.monotonic() > deadline:
            raise ConfigError(f"pyvirtd did not answer within {START_TIMEOUT:.0f} s (see {log_path})")
        time.sleep(0.05)
    return api_socket(state)


def stop_daemon(state: Path, timeout: float = 20.0) -> int:
    """SIGTERM to the state directory's daemon (its VMs go on); its pid once it has ended."""
    try:
        pid = int((state / "pyvirtd.lock").read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if not pid or not running(state):
        raise ConfigError(f"pyvirtd is not running for {state}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while api_socket(state).exists() or _alive(pid):
        if time.monotonic() > deadline:
            raise ConfigError(f"pyvirtd (pid {pid}) did not end within {timeout:.0f} s of SIGTERM")
        time.sleep(0.05)
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own child, not yet reaped) has ended
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyvirtd", description="the pyvirt hypervisor service")
    ap.add_argument("--state-dir", help="state directory (default $PYVIRT_STATE_DIR or ~/.local/state/pyvirt)")
    ap.add_argument("--foreground", action="store_true", help="(the default here; for symmetry with "
                                                              "`pyvirt daemon`)")
    ap.add_argument("--no-jail", action="store_true",
                    help="run VMs' runners unconfined (for debugging; also PYVIRT_JAIL=off)")
    ap.add_argument("--tls-creds", metavar="DIR",
                    help="x509 credentials (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, "
                         "client-key.pem, as QEMU's tls-creds-x509): migrations over TCP use mutual TLS")
    args = ap.parse_args(argv)
    try:
        serve(state_dir(args.state_dir), jail=False if args.no_jail else None, tls_creds=args.tls_creds)
    except PyvirtError as e:
        sys.stderr.write(f"pyvirtd: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
