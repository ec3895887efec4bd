"""pyvirt.Client's guest agent calls (a mixin of `Client`), over pyvirtd's API socket:

    s = c.exec("web", ["sh", "-c", "echo hi; exit 3"])        # a RemoteExec
    for ev in s.events(): ...                                  # ExecEvent: stream 1/2 data, then the end
    c.run("web", ["uname", "-a"]) -> (status, stdout, stderr)
    c.copy_from("web", "/etc/os-release", "here/"); c.copy_to("web", "f.txt", "/root/f.txt")
    c.guest_ports("web") -> [22, 80]
    c.tcp("web", 80) -> a WebSocket carrying the guest's 127.0.0.1:80 stream

Exec and TCP streams are WebSockets (`websockets`' sync client over the Unix socket); files
are chunked HTTP.  What the daemon relays is checked again here with the same bounds as
host/agent.py (the daemon relays a hostile guest's bytes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from pyvirt.host.agent import FRAME, MAX_PAYLOAD, AgentError, ExecStream, local_target, save_local

WS_MAX = MAX_PAYLOAD + FRAME.size


def _ws_error(e: Exception) -> AgentError:
    reason = getattr(getattr(e, "rcvd", None), "reason", "") or str(e)
    return AgentError(reason.splitlines()[0] if reason else "the exec stream ended")


class RemoteExec(ExecStream):
    """A command running in a pyvirtd VM, its frames relayed by the daemon's WebSocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    def _frame(self) -> tuple[str, bytes]:
        from websockets.exceptions import ConnectionClosed
        try:
            msg = self.ws.recv()
        except ConnectionClosed as e:
            raise _ws_error(e) from None
        if not isinstance(msg, bytes) or len(msg) < FRAME.size \
                or FRAME.unpack(msg[:FRAME.size])[0] != len(msg) - FRAME.size:
            raise AgentError("pyvirtd sent a malformed exec message")
        return chr(msg[4]), msg[FRAME.size:]

    def _send(self, typ: str, payload: bytes = b"") -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            self.ws.send(FRAME.pack(len(payload), ord(typ)) + payload)
        except ConnectionClosed as e:
            raise _ws_error(e) from None

    def close(self) -> None:
        self.ws.close()


class AgentCalls:
    """Mixed into pyvirt.Client (which provides `socket` and `_http`)."""

    socket: Path
    _http: httpx.Client

    def _ws(self, path: str) -> Any:
        from websockets.sync.client import unix_connect
        try:
            ws = unix_connect(str(self.socket), f"ws://pyvirtd{path}", max_size=WS_MAX,
                              open_timeout=30, close_timeout=5)
            # The connection outlives this call (a RemoteExec, a port's stream): it is entered
            # here as the context manager websockets (17.1 on) asks for, and its `close()`,
            # which is what leaving that context does, ends it.
            return ws.__enter__()
        except OSError as e:
            raise AgentError(f"pyvirtd is not reachable on {self.socket}: {e.strerror or e}") from None

    def exec(self, name: str, argv: list[str], tty: bool = False, stdin: bool = False,
             size: tuple[int, int] = (24, 80)) -> RemoteExec:
        import json
        ws = self._ws(f"/vms/{name}/exec")
        ws.send(json.dumps({"argv": argv, "tty": tty, "stdin": stdin, "rows": size[0], "cols": size[1]}))
        return RemoteExec(ws)

    def run(self, name: str, argv: list[str], input: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Run `argv` in VM `name` to its end: (status as a shell reports it, stdout, stderr)."""
        return self.exec(name, argv, stdin=input is not None).collect(input)

    def tcp(self, name: str, port: int) -> Any:
        """A WebSocket whose binary messages are the bytes of a TCP connection to the guest's
        127.0.0.1:`port` (made by its agent)."""
        return self._ws(f"/vms/{name}/tcp/{port}")

    def guest_ports(self, name: str) -> list[int]:
        return self._call("GET", f"/vms/{name}/ports")       # type: ignore[attr-defined,no-any-return]

    def copy_from(self, name: str, guest_path: str, dest: str | os.PathLike[str]) -> int:
        """The guest's `guest_path` into `dest` (a file, or an existing directory)."""
        target = local_target(guest_path, Path(dest))
        with self._http.stream("GET", f"/vms/{name}/files", params={"path": guest_path},
                               timeout=httpx.Timeout(60.0, read=None)) as r:
            if r.status_code >= 400:
                r.read()
                raise AgentError(_detail(r))
            try:
                size, mode = int(r.headers["x-pyvirt-size"]), int(r.headers["x-pyvirt-mode"], 8)
            except (KeyError, ValueError):
                raise AgentError("pyvirtd sent no file size and mode") from None

            def chunks() -> Iterator[bytes]:
                try:
                    yield from r.iter_bytes(MAX_PAYLOAD)
                except httpx.HTTPError:
                    return                               # cut short: save_local says so
            return save_local(target, guest_path, size, mode, chunks())

    def copy_to(self, name: str, src: str | os.PathLike[str], guest_path: str, mode: int | None = None) -> int:
        """The host file `src` to `guest_path` in the guest (with its mode, or `mode`)."""
        try:
            f = open(src, "rb")
        except OSError as e:
            raise AgentError(f"{src}: {e.strerror}") from None
        with f:
            m = os.fstat(f.fileno()).st_mode & 0o7777 if mode is None else mode & 0o7777

            def body() -> Iterator[bytes]:
                while chunk := f.read(MAX_PAYLOAD):
                    yield chunk
            r = self._http.put(f"/vms/{name}/files", params={"path": guest_path, "mode": f"{m:o}"},
                               content=body(), timeout=httpx.Timeout(60.0, read=None))
        if r.status_code >= 400:
            raise AgentError(_detail(r))
        return int(r.json()["size"])


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail", r.text))
    except ValueError:
        return r.text[:200] or f"HTTP {r.status_code}"
