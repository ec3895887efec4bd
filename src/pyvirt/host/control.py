"""The runner's control protocol: JSON lines on a Unix stream socket.

Each request is one JSON object on one line, `{"op": OP, ...}`; each gets one
reply line, `{"ok": true, ...}` or `{"ok": false, "error": MESSAGE}`.  Several
clients may be connected; requests are served by the runner's run loop
between CPU slices (and at once while the VM is paused).

    status                   -> state (running|paused), pid, instructions, resets (guest
                                reboots), agent (the guest
                                agent has its port open), console_attached
    pause / resume           -> state
    stop                     -> asks the guest to power off through the agent (resumes a paused
                                VM first); agent: whether the agent is there to hear it
    kill                     -> the VM ends now (disks are still flushed and closed)
    hostname {name}          -> the guest agent sets the host name
    mac {iface, address}     -> the guest agent sets interface ethN's MAC address
    snapshot {dir, then[, live_dir]}
                             -> Vm.request_snapshot(dir, then=then, done=..., live_dir=...) where the VMM
                                has it (then: continue|quit), else {"ok": false, "error":
                                "snapshot is not supported ..."}; the outcome shows later in
                                status as "snapshot": {dir, then, ok, error}
    migrate {token, downtime, timeout, on_timeout} with a connected socket passed along
                             (SCM_RIGHTS: the jailed runner opens no socket) -> the migration
                                starts (host/migration.py); its progress shows in status as
                                "migration"

Descriptors a request carries (SCM_RIGHTS) reach the handler as req["_fds"], and are closed
after it unless it took them (set them to -1).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyvirt.fsutil import listen_unix

MAX_LINE = 64 * 1024
MAX_FDS = 4                     # descriptors one request may carry
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """The runner did not answer (not there, or it closed the connection)."""


# In the VM directory: the disks the VM writes, written by the runner when a snapshot moved them
# onto new overlays (before its guest runs again), recorded by the daemon (snapshots._sync_disks).
DISKS_FILE = "disks.json"


def request(path: str | Path, op: str, timeout: float = 5.0, fds: list[int] | None = None,
            **args: Any) -> dict[str, Any]:
    """Send one request to the control socket at `path` (with descriptors `fds`); its reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        line = json.dumps({"op": op, **args}).encode() + b"\n"
        if fds:
            sent = socket.send_fds(s, [line], fds)
            line = line[sent:]
        s.sendall(line)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ControlError("the runner closed the control connection")
            buf += chunk
        reply = json.loads(buf.split(b"\n", 1)[0])
    except (OSError, ValueError) as e:
        raise ControlError(f"no answer on {path}: {e}") from None
    finally:
        s.close()
    if not isinstance(reply, dict):
        raise ControlError(f"a malformed reply on {path}")
    return reply


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class ControlServer:
    """The runner's side: a listening socket and its clients, served without blocking
    (`fds()` and `on_ready()` make a `pyvirt.vmm.vm.Watch`)."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.server = listen_unix(path)
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}

    def fds(self) -> list[int]:
        return [self.server.fileno(), *self.clients]

    def on_ready(self, ready: list[int]) -> None:
        for fd in ready:
            if fd == self.server.fileno():
                self._accept()
            elif fd in self.clients:
                self._read(fd)

    def _accept(self) -> None:
        try:
            conn, _ = self.server.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.settimeout(2.0)                 # replies are small: a stuck client cannot hold us long
        self.clients[conn.fileno()] = (conn, bytearray())

    def _drop(self, fd: int) -> None:
        conn, _ = self.clients.pop(fd)
        conn.close()

    def _read(self, fd: int) -> None:
        conn, buf = self.clients[fd]
        passed: list[int] = []
        try:
            data, passed, _, _ = socket.recv_fds(conn, 65536, MAX_FDS)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:
            _close_all(passed)
            self._drop(fd)
            return
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            reply = self._handle(line, passed)
            passed = []
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                self._drop(fd)
                return
        if len(buf) > MAX_LINE:
            self._drop(fd)

    def _handle(self, line: bytes, passed: list[int]) -> dict[str, Any]:
        try:
            try:
                req = json.loads(line)
            except ValueError:
                return {"ok": False, "error": "a request is one JSON object per line"}
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                return {"ok": False, "error": 'a request needs "op" (a string)'}
            req["_fds"] = passed              # (whatever the JSON said: only what was passed)
            try:
                return self.handler(req)
            except Exception as e:            # a bad request must not end the VM
                return {"ok": False, "error": f"{req['op']}: {e}"}
        finally:
            _close_all(passed)

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        self.server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
