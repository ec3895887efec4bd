"""Creating, listing and removing networks: one switch process per network.

Files live in `<runtime>/networks/` where the runtime directory is
$PYVIRT_RUNTIME_DIR, else $XDG_RUNTIME_DIR/pyvirt, else /tmp/pyvirt-<uid>
(made with mode 0700)::

    <NAME>.sock   the switch's socket (join with --net network=NAME or stream=SOCK)
    <NAME>.pid    its PID; the switch holds an exclusive lock on it while it runs,
                  so "alive" means "the lock is held" (no trust in PID reuse)
    <NAME>.json   name, socket, pid, created (Unix time), ports (connected now)
    <NAME>.log    the switch's own messages
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pyvirt.errors import ConfigError
from pyvirt.fsutil import private_dir

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def _check_name(name: str) -> None:
    if not valid_name(name):
        raise ConfigError(f"invalid network name {name!r} (1 to 32 letters, digits, '_' or '-')")


def runtime_dir() -> Path:
    """$PYVIRT_RUNTIME_DIR, else $XDG_RUNTIME_DIR/pyvirt, else /tmp/pyvirt-<uid>; made 0700."""
    env = os.environ.get("PYVIRT_RUNTIME_DIR")
    if env:
        d = Path(env)
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        d = Path(xdg) / "pyvirt" if xdg else Path(f"/tmp/pyvirt-{os.getuid()}")
    return private_dir(d, "runtime directory")


@dataclass(frozen=True)
class NetworkPaths:
    sock: Path
    pid: Path
    state: Path
    log: Path


def network_paths(name: str) -> NetworkPaths:
    d = runtime_dir() / "networks"
    try:
        d.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot make {d}: {e.strerror}") from None
    return NetworkPaths(d / f"{name}.sock", d / f"{name}.pid", d / f"{name}.json", d / f"{name}.log")


def write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def _alive(paths: NetworkPaths) -> bool:
    """Whether a switch holds the lock on the PID file."""
    try:
        fd = os.open(paths.pid, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _read_pid(paths: NetworkPaths) -> int | None:
    try:
        return int(paths.pid.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cleanup(paths: NetworkPaths, keep_log: bool = False) -> None:
    for p in (paths.sock, paths.state, paths.pid) + (() if keep_log else (paths.log,)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _accepts(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def create_network(name: str) -> Path:
    """Start the switch for network `name` in the background; its socket path."""
    _check_name(name)
    paths = network_paths(name)
    if _alive(paths):
        raise ConfigError(f"network {name} already exists (pyvirt network rm {name} first)")
    _cleanup(paths)                                    # what a dead switch left
    env = dict(os.environ, PYVIRT_RUNTIME_DIR=str(runtime_dir()))
    with open(paths.log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "pyvirt.network.switch", name],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not (paths.sock.exists() and _accepts(paths.sock)):
        if proc.poll() is not None:
            why = _last_line(paths.log) or f"exit status {proc.returncode}"
            raise ConfigError(f"the switch for network {name} did not start: {why}")
        if time.monotonic() > deadline:
            proc.kill()
            raise ConfigError(f"the switch for network {name} did not start within "
                              f"{START_TIMEOUT:.0f} s (see {paths.log})")
        time.sleep(0.02)
    return paths.sock


@dataclass
class NetworkInfo:
    name: str
    socket: Path
    alive: bool
    pid: int | None
    ports: int | None
    created: float | None


def list_networks() -> list[NetworkInfo]:
    d = runtime_dir() / "networks"
    names = sorted({p.stem for p in d.glob("*") if p.suffix in (".pid", ".json", ".sock")
                    and valid_name(p.stem)}) if d.is_dir() else []
    out = []
    for name in names:
        paths = network_paths(name)
        alive = _alive(paths)
        state: dict[str, object] = {}
        try:
            state = json.loads(paths.state.read_text())
        except (OSError, ValueError):
            pass
        ports = state.get("ports")
        created = state.get("created")
        out.append(NetworkInfo(name, paths.sock, alive, _read_pid(paths),
                               ports if alive and isinstance(ports, int) else None,
                               created if isinstance(created, (int, float)) else None))
    return out


def remove_network(name: str) -> None:
    """Stop network `name`'s switch and remove its files."""
    _check_name(name)
    paths = network_paths(name)
    if not any(p.exists() for p in (paths.pid, paths.state, paths.sock)):
        raise ConfigError(f"no network named {name}")
    if _alive(paths):
        pid = _read_pid(paths)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + STOP_TIMEOUT
            while _alive(paths) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(paths):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                while _alive(paths) and time.monotonic() < deadline + STOP_TIMEOUT:
                    time.sleep(0.02)
            # The switch drops its lock before its interpreter has ended: rm returns once it has.
            while _running(pid) and time.monotonic() < deadline + STOP_TIMEOUT:
                time.sleep(0.02)
    _cleanup(paths)


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has ended: only its parent can reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def network_socket(name: str) -> Path:
    """The socket of running network `name` (ConfigError if there is none)."""
    if not valid_name(name):
        raise ConfigError(f"invalid network name {name!r} (1 to 32 letters, digits, '_' or '-')")
    paths = network_paths(name)
    if not _alive(paths) or not paths.sock.exists():
        if any(f.exists() for f in (paths.sock, paths.state, paths.pid)):
            raise ConfigError(f"network {name} is not alive (its switch ended; see {paths.log}): start it "
                              f"again with `pyvirt network create {name}`, or remove it with "
                              f"`pyvirt network rm {name}`")
        raise ConfigError(f"no network named {name} (pyvirt network create {name})")
    return paths.sock
