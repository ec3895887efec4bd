"""pyvirtd's guest agent endpoints (added to the app by api.make_app; docs/agent.md):

    WS   /vms/{name}/exec              a command in the guest: the first message is JSON
                                       {argv, tty, stdin, rows, cols}; then binary messages, each
                                       one agent frame (docs/agent.md): stdin/window/signal frames
                                       from the client, output and the exit frame to it
    GET  /vms/{name}/files?path=P      a guest file, streamed (chunked); its mode and size in the
                                       X-Pyvirt-Mode and X-Pyvirt-Size headers
    PUT  /vms/{name}/files?path=P&mode=M   write a guest file from the streamed request body
    GET  /vms/{name}/ports             TCP ports something listens on in the guest
    WS   /vms/{name}/tcp/{port}        a byte stream to the guest's 127.0.0.1:PORT (`pyvirt port`)

The daemon relays frames after checking them (host/agent.py's bounds): neither a client nor
the agent can make it hold more than a frame per direction and connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

from anyio import to_thread
from fastapi import FastAPI, Path, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from pyvirt.host.agent import (
    FRAME,
    MAX_PAYLOAD,
    REQUEST_TIMEOUT,
    Agent,
    AgentConnection,
    AgentError,
    exec_payload,
)
from pyvirt.host.errors import Conflict, Invalid, NotFound

NamePath = Path(..., description="the VM's name (or id)")
CLIENT_FRAMES = frozenset("IWK")            # what an exec client may send
WS_CLOSE_ERROR = 4000                       # close code carrying a one-line reason


def vm_agent(manager: Any, name: str) -> Agent:
    """The agent of running VM `name` (Conflict if it is not running)."""
    rec = manager._running(name)
    return Agent(manager.paths(rec).vsock_sock)


BOOT_WAIT = 60.0        # seconds a request waits for the agent of a VM that is still booting


def connect(agent: Agent, timeout: float | None = REQUEST_TIMEOUT) -> AgentConnection:
    """A connection to the agent, waiting up to BOOT_WAIT for a guest that has not started
    it yet (a VM just started); AgentError after that."""
    deadline = time.monotonic() + BOOT_WAIT
    while True:
        try:
            return agent.connect(timeout)
        except AgentError as e:
            if "not reachable" not in str(e) and "closed the connection" not in str(e) \
                    or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _agent_error(e: AgentError) -> Exception:
    msg = str(e)
    if "No such file" in msg or "not a regular file" in msg:
        return NotFound(msg)
    if "not reachable" in msg:
        return Conflict(msg)
    return Invalid(msg)


def add_agent_routes(app: FastAPI, manager: Any, errors: dict[int | str, dict[str, Any]]) -> None:
    @app.get("/vms/{name}/ports", responses=errors, summary="TCP ports listening in the guest (its agent)")
    def guest_ports(name: str = NamePath) -> list[int]:
        try:
            with connect(vm_agent(manager, name)) as conn:
                conn.send("L")
                text = conn.expect("T")[1].decode(errors="replace")
            return sorted({int(w) for w in text.split() if w.isdigit() and 0 < int(w) < 65536})
        except AgentError as e:
            raise _agent_error(e) from None

    @app.get("/vms/{name}/files", responses=errors, summary="read a file from the guest (streamed)")
    def get_file(name: str = NamePath, path: str = Query(..., min_length=1, max_length=4000)) -> StreamingResponse:
        agent = vm_agent(manager, name)
        try:
            conn = connect(agent)
            conn.send("R", path.encode())
            _, meta = conn.expect("M")
            if len(meta) != 12:
                raise AgentError("the guest agent sent malformed file information")
        except AgentError as e:
            with contextlib.suppress(NameError):
                conn.close()
            raise _agent_error(e) from None
        mode, lo, hi = struct.unpack("<III", meta)
        size = lo | hi << 32

        def body() -> Iterator[bytes]:
            sent = 0
            try:
                while True:
                    typ, data = conn.expect("D", "Z")
                    if typ == "Z":
                        return
                    sent += len(data)
                    if sent > size:
                        raise AgentError("the guest agent sent more than it announced")
                    yield data
            finally:
                conn.close()

        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"X-Pyvirt-Mode": f"{mode & 0o7777:o}", "X-Pyvirt-Size": str(size)})

    @app.put("/vms/{name}/files", responses=errors, summary="write a file in the guest (streamed body)")
    async def put_file(request: Request, name: str = NamePath,
                       path: str = Query(..., min_length=1, max_length=4000),
                       mode: str = Query("644", pattern=r"^[0-7]{1,4}$")) -> dict[str, Any]:
        agent = await to_thread.run_sync(vm_agent, manager, name)
        try:
            conn = await to_thread.run_sync(connect, agent)
        except AgentError as e:
            raise _agent_error(e) from None
        try:
            conn.send("P", struct.pack("<I", int(mode, 8)) + path.encode())
            total = 0
            pending = bytearray()
            async for chunk in request.stream():
                pending += chunk
                while len(pending) >= MAX_PAYLOAD:
                    await to_thread.run_sync(conn.send, "D", bytes(pending[:MAX_PAYLOAD]))
                    del pending[:MAX_PAYLOAD]
                    total += MAX_PAYLOAD
            if pending:
                await to_thread.run_sync(conn.send, "D", bytes(pending))
                total += len(pending)
            conn.send("Z")
            await to_thread.run_sync(conn.expect, "Z")
        except AgentError as e:
            raise _agent_error(e) from None
        finally:
            conn.close()
        return {"path": path, "size": total}

    @app.websocket("/vms/{name}/exec")
    async def exec_ws(ws: WebSocket, name: str) -> None:
        await ws.accept()
        conn: AgentConnection | None = None
        try:
            try:
                req = json.loads(await ws.receive_text())
            except (ValueError, RecursionError):
                raise AgentError("an exec request is a JSON object") from None
            if not isinstance(req, dict):
                raise AgentError("an exec request is a JSON object")
            payload = exec_payload(req.get("argv"), bool(req.get("tty")), bool(req.get("stdin")),
                                   (_int(req.get("rows"), 24), _int(req.get("cols"), 80)))
            agent = await to_thread.run_sync(vm_agent, manager, name)
            conn = await to_thread.run_sync(connect, agent, None)
            conn.send("E", payload)
            await _relay_exec(ws, conn)
        except (AgentError, Conflict, NotFound, ValueError, KeyError, WebSocketDisconnect) as e:
            await _end(ws, conn, e)

    @app.websocket("/vms/{name}/tcp/{port}")
    async def tcp_ws(ws: WebSocket, name: str, port: int) -> None:
        await ws.accept()
        conn: AgentConnection | None = None
        try:
            if not 0 < port < 65536:
                raise AgentError(f"TCP port {port} is not 1..65535")
            agent = await to_thread.run_sync(vm_agent, manager, name)
            conn = await to_thread.run_sync(connect, agent, None)
            conn.send("N", struct.pack("<H", port))
            await to_thread.run_sync(conn.expect, "Z")
            await _relay_bytes(ws, conn)
        except (AgentError, Conflict, NotFound, KeyError, WebSocketDisconnect) as e:
            await _end(ws, conn, e)


async def _end(ws: WebSocket, conn: AgentConnection | None, e: Exception) -> None:
    """A stream ended by an error: its one line is the close reason (a client that left
    gets nothing); the agent connection is closed."""
    if conn is not None:
        conn.close()
    if not isinstance(e, WebSocketDisconnect):
        with contextlib.suppress(Exception):
            await ws.close(WS_CLOSE_ERROR, _reason(str(e)))


def _int(v: Any, default: int) -> int:
    if v is None:
        return default
    if not isinstance(v, int) or not 0 <= v <= 0xFFFF:
        raise ValueError("rows and cols are 0..65535")
    return v


def _reason(text: str) -> str:
    return text.encode()[:120].decode(errors="ignore")     # a close reason is at most 123 bytes


async def _relay_exec(ws: WebSocket, conn: AgentConnection) -> None:
    """Agent frames to the client (checked), client frames (I, W, K only) to the agent."""

    async def to_client() -> None:
        while True:
            typ, data = await to_thread.run_sync(conn.expect, "1", "2", "x")
            await ws.send_bytes(FRAME.pack(len(data), ord(typ)) + data)
            if typ == "x":
                return

    async def to_agent() -> None:
        while True:
            msg = await ws.receive_bytes()
            if len(msg) < FRAME.size:
                raise AgentError("a frame from the client is shorter than its header")
            n, typ = FRAME.unpack(msg[:FRAME.size])
            if n != len(msg) - FRAME.size or n > MAX_PAYLOAD or chr(typ) not in CLIENT_FRAMES:
                raise AgentError("the client sent a malformed frame")
            await to_thread.run_sync(conn.send, chr(typ), msg[FRAME.size:])

    out = asyncio.ensure_future(to_client())
    inp = asyncio.ensure_future(to_agent())
    try:
        done, _ = await asyncio.wait({out, inp}, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()                                  # an error ends the session
    finally:
        for t in (out, inp):
            t.cancel()
        conn.close()                                     # unblocks a thread waiting on the agent
    with contextlib.suppress(Exception):
        await ws.close()


async def _relay_bytes(ws: WebSocket, conn: AgentConnection) -> None:
    sock = conn.sock

    async def to_client() -> None:
        while True:
            data = await to_thread.run_sync(sock.recv, MAX_PAYLOAD)
            if not data:
                return
            await ws.send_bytes(data)

    async def to_agent() -> None:
        while True:
            msg = await ws.receive_bytes()
            if len(msg) > MAX_PAYLOAD:
                raise AgentError("a message over 64 KiB")
            await to_thread.run_sync(sock.sendall, msg)

    out = asyncio.ensure_future(to_client())
    inp = asyncio.ensure_future(to_agent())
    try:
        await asyncio.wait({out, inp}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (out, inp):
            t.cancel()
        conn.close()
    with contextlib.suppress(Exception):
        await ws.close()
