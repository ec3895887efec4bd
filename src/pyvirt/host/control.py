"""The runner's control protocol: typed messages, one JSON object a line, on a Unix stream socket.

Each request is one small pydantic model (its "op" says which); each gets one reply,
the request's own reply model (`ok` true) or `Refused` (`ok` false, one sentence).  Both
ends validate what they read against these models: a peer's bad line is one clear
error (a `Refused` reply to a bad request, `ProtocolError` for a bad reply), never a
traceback.  Several clients may be connected; requests are served by the runner's run
loop between CPU slices (and at once while the VM is paused).

    Status                  -> StatusReply: state (running|paused), pid, instructions,
                               resets (guest reboots), agent (the guest agent has its port
                               open), console_attached, snapshot (the last one's outcome),
                               migration (the last one's progress)
    Pause / Resume          -> StateReply
    Stop                    -> StopReply: asks the guest to power off through the agent
                               (resumes a paused VM first); agent: whether it is there
    Kill                    -> Done: the VM ends now (disks are still flushed and closed)
    Hostname {name}         -> Done: the guest agent sets the host name
    Mac {iface, address}    -> Done: the guest agent sets interface ethN's MAC address
    Snapshot {dir, then, live_dir?}
                            -> SnapshotReply, sent when the snapshot is written (or has
                               failed): outcome {dir, then, ok, error}.  The runner is busy
                               meanwhile; the caller waits up to SNAPSHOT_TIMEOUT.
    Migrate {token, downtime, timeout, on_timeout, to} with a connected socket passed along
                            -> Done: the migration starts (host/migration.py; SCM_RIGHTS: the
                               jailed runner opens no socket); its progress shows in
                               StatusReply's migration (a MigrationProgress)

A request that carries descriptors (SCM_RIGHTS, `Request.FDS` of them: only Migrate) gets
them as `req.fds`, checked in number like its fields; they are closed after the handler
unless it took them (set them to -1).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError

from pyvirt.fsutil import listen_unix

MAX_LINE = 64 * 1024
MAX_FDS = 4                     # descriptors one request may carry
SNAPSHOT_TIMEOUT = 600.0        # writing a snapshot (RAM is scanned, non-zero pages written)

# In the VM directory: the disks the VM writes, written by the runner when a snapshot moved them
# onto new overlays (before its guest runs again), recorded by the daemon (supervisor.sync_disks).
DISKS_FILE = "disks.json"


class ControlError(Exception):
    """The runner did not answer (not there, or it closed the connection)."""


class ProtocolError(ControlError):
    """The peer's line is not a message of this protocol (one sentence: which and why)."""


class Refused(Exception):
    """The runner answered the request with an error (`Refused.error`)."""


# -- replies -------------------------------------------------------------------------------
class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorReply(_Message):
    ok: Literal[False] = False
    error: str = Field(max_length=4096)


class Done(_Message):
    ok: Literal[True] = True


class StateReply(Done):
    state: Literal["running", "paused"]


class StopReply(Done):
    agent: bool


class SnapshotOutcome(_Message):
    dir: str
    then: Literal["continue", "quit"]
    ok: bool | None                  # None: being taken
    error: str | None = None


class SnapshotReply(Done):
    snapshot: SnapshotOutcome


class MigrationProgress(_Message):
    """A migration's figures so far (vmm/migration.py's MigrationStats)."""
    rounds: int
    pages_sent: int
    blocks_sent: int = 0
    bytes_sent: int
    total_seconds: float
    downtime_seconds: float
    throttle: float
    bandwidth: float
    guest_instructions: int
    outcome: Literal["running", "completed", "cancelled", "failed"]
    error: str | None = None


class StatusReply(StateReply):
    pid: int
    instructions: int
    resets: int
    agent: bool
    console_attached: bool
    snapshot: SnapshotOutcome | None = None
    migration: MigrationProgress | None = None


# -- requests ------------------------------------------------------------------------------
class Request(_Message):
    Reply: ClassVar[type[Done]] = Done
    FDS: ClassVar[int] = 0           # descriptors the request carries (SCM_RIGHTS)
    op: str
    _fds: list[int] = PrivateAttr(default_factory=list)

    @property
    def fds(self) -> list[int]:
        """The descriptors passed along with the request (the server's; take one by setting
        its entry to -1)."""
        return self._fds


class Status(Request):
    Reply: ClassVar[type[Done]] = StatusReply
    op: Literal["status"] = "status"


class Pause(Request):
    Reply: ClassVar[type[Done]] = StateReply
    op: Literal["pause"] = "pause"


class Resume(Request):
    Reply: ClassVar[type[Done]] = StateReply
    op: Literal["resume"] = "resume"


class Stop(Request):
    Reply: ClassVar[type[Done]] = StopReply
    op: Literal["stop"] = "stop"


class Kill(Request):
    op: Literal["kill"] = "kill"


class Hostname(Request):
    op: Literal["hostname"] = "hostname"
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class Mac(Request):
    op: Literal["mac"] = "mac"
    iface: str = Field(pattern=r"^eth[0-9]{1,3}$")
    address: str = Field(pattern=r"^(?:[0-9a-f]{2}:){5}[0-9a-f]{2}$")


class Snapshot(Request):
    Reply: ClassVar[type[Done]] = SnapshotReply
    op: Literal["snapshot"] = "snapshot"
    dir: str = Field(min_length=1, max_length=4096)
    then: Literal["continue", "quit"] = "continue"
    live_dir: str | None = Field(None, min_length=1, max_length=4096)
    shares_unmounted: bool = False      # the daemon unmounted the VM's shares in the guest


class Migrate(Request):
    """Migrate the running VM to the destination at the other end of the connected socket
    passed along (host/migration.py `runner_migrate`)."""
    FDS: ClassVar[int] = 1
    op: Literal["migrate"] = "migrate"
    token: str = Field(max_length=4096)
    downtime: float = Field(0.3, gt=0, le=60)          # seconds: the stop-and-copy target
    timeout: float = Field(600.0, gt=0, le=86400)      # seconds, then on_timeout
    on_timeout: Literal["cancel", "force"] = "cancel"
    to: str = Field("", max_length=4096)              # the destination's address (for the record)
    copy_storage: bool = False                        # copy the disks too (else they are shared)


REQUESTS: tuple[type[Request], ...] = (Status, Pause, Resume, Stop, Kill, Hostname, Mac, Snapshot, Migrate)
OPS = tuple(r.model_fields["op"].default for r in REQUESTS)
_ANY_REQUEST: TypeAdapter[Request] = TypeAdapter(
    Annotated[Status | Pause | Resume | Stop | Kill | Hostname | Mac | Snapshot | Migrate,
              Field(discriminator="op")])


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"][1:] or err["loc"]) or "message"
    return f"{where}: {err['msg']}"


def parse_request(line: bytes) -> Request:
    """The request on `line`; ProtocolError (one sentence) when it is not one."""
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):               # (RecursionError: "[[[[..." nested too deep)
        raise ProtocolError("a request is one JSON object per line") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("op"), str):
        raise ProtocolError('a request needs "op" (a string)')
    op = raw["op"]
    if op not in OPS:
        raise ProtocolError(f"unknown op {op[:40]!r} ({', '.join(OPS)})")
    try:
        return _ANY_REQUEST.validate_python(raw)
    except ValidationError as e:
        raise ProtocolError(f"{op}: {_first_error(e)}") from None


def parse_reply(req: Request, raw: Any) -> Done:
    """`raw` (a decoded line) as the reply to `req`; Refused for an error reply, ProtocolError
    for anything else that is not `req`'s reply."""
    if isinstance(raw, dict) and raw.get("ok") is False:
        try:
            raise Refused(ErrorReply.model_validate(raw).error)
        except ValidationError as e:
            raise ProtocolError(f"a malformed error reply to {req.op}: {_first_error(e)}") from None
    try:
        return req.Reply.model_validate(raw)
    except ValidationError as e:
        raise ProtocolError(f"a malformed reply to {req.op}: {_first_error(e)}") from None


# -- the client ------------------------------------------------------------------------------
def _exchange(path: str | Path, line: bytes, timeout: float, fds: list[int] | None = None) -> Any:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        line += b"\n"
        if fds:                              # (with the line's first bytes)
            sent = socket.send_fds(s, [line], fds)
            line = line[sent:]
        s.sendall(line)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ControlError("the runner closed the control connection")
            buf += chunk
            if len(buf) > MAX_LINE:
                raise ProtocolError(f"a reply on {path} longer than {MAX_LINE} bytes")
        return json.loads(buf.split(b"\n", 1)[0])
    except (ValueError, RecursionError):
        raise ProtocolError(f"a reply on {path} that is not JSON") from None
    except OSError as e:
        raise ControlError(f"no answer on {path}: {e}") from None
    finally:
        s.close()


def call(path: str | Path, req: Request, timeout: float | None = None, fds: list[int] | None = None) -> Done:
    """Send `req` to the control socket at `path` (with the descriptors `fds`, SCM_RIGHTS);
    its reply, validated (a `req.Reply`).  Raises Refused when the runner answered with an
    error, ControlError when it did not answer (ProtocolError: not with a reply of this
    protocol)."""
    if timeout is None:
        timeout = SNAPSHOT_TIMEOUT if isinstance(req, Snapshot) else 5.0
    return parse_reply(req, _exchange(path, req.model_dump_json(exclude_none=True).encode(), timeout, fds))


def request(path: str | Path, op: str, timeout: float | None = None, fds: list[int] | None = None,
            **args: Any) -> dict[str, Any]:
    """Send one untyped request line (a test's probe: bad requests included; with
    descriptors `fds`); the reply as a dict, unchecked.  The daemon uses `call`."""
    if timeout is None:
        timeout = SNAPSHOT_TIMEOUT if op == "snapshot" else 5.0
    reply = _exchange(path, json.dumps({"op": op, **args}).encode(), timeout, fds)
    if not isinstance(reply, dict):
        raise ProtocolError(f"a malformed reply on {path}")
    return reply


# -- the server ------------------------------------------------------------------------------
def _close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


Respond = Callable[[Done], None]
# handler(request, respond): the reply now, or None and `respond(reply)` later (once)
Handler = Callable[[Request, Respond], "Done | None"]


class ControlServer:
    """The runner's side: a listening socket and its clients, served without blocking
    (`fds()` and `on_ready()` make a `pyvirt.vmm.vm.Watch`).  Requests are parsed into their
    models before the handler sees them; its replies are checked against the request's
    reply model before they are sent."""

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
        try:
            while b"\n" in buf and fd in self.clients:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                self._handle(fd, conn, line, passed)     # (descriptors: with the first line)
                passed = []
        finally:
            _close_all(passed)                # (none was left for a line, or the client went)
        if fd in self.clients and len(buf) > MAX_LINE:
            self._drop(fd)

    def _send(self, fd: int, conn: socket.socket, reply: Done | ErrorReply) -> None:
        if self.clients.get(fd, (None,))[0] is not conn:
            return                            # the client has gone (its fd may be another's now)
        try:
            conn.sendall(reply.model_dump_json().encode() + b"\n")
        except OSError:
            self._drop(fd)

    def _handle(self, fd: int, conn: socket.socket, line: bytes, passed: list[int]) -> None:
        try:
            req = parse_request(line)
            if len(passed) != req.FDS:
                raise ProtocolError(f"{req.op} needs {req.FDS} descriptor(s) passed along (SCM_RIGHTS), "
                                    f"not {len(passed)}")
        except ProtocolError as e:
            _close_all(passed)
            self._send(fd, conn, ErrorReply(error=str(e)))
            return
        req._fds = passed                     # (whatever the JSON said: only what was passed)
        answered = False

        def respond(reply: Done | ErrorReply) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            if not isinstance(reply, (req.Reply, ErrorReply)):
                reply = ErrorReply(error=f"{req.op}: the runner made a reply of the wrong kind")
            self._send(fd, conn, reply)

        reply: Done | ErrorReply | None
        try:
            reply = self.handler(req, respond)
        except Refused as e:
            reply = ErrorReply(error=str(e))
        except Exception as e:                # a bad request must not end the VM
            reply = ErrorReply(error=f"{req.op}: {e}")
        finally:
            _close_all(req.fds)               # (those the handler did not take)
        if reply is not None:
            respond(reply)

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        self.server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
