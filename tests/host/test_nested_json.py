"""JSON nested deeper than the parser's recursion limit is a one-line refusal on every
socket a peer writes to, not a RecursionError out of the handler: the REST exec WebSocket
(a client) and the control client's reading of a runner's reply (a jailed runner is only as
trusted as its guest)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from pyvirt.host import control
from pyvirt.host.agent_api import add_agent_routes
from pyvirt.host.control import ProtocolError

DEEP = "[" * 100_000


def test_an_exec_request_nested_too_deep_is_closed_with_one_line() -> None:
    class NoManager:                     # never reached: the request is refused first
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"the manager was used ({name})")

    app = FastAPI()
    add_agent_routes(app, NoManager(), {})
    with TestClient(app) as client, client.websocket_connect("/vms/x/exec") as ws:
        ws.send_text(DEEP)
        with pytest.raises(WebSocketDisconnect) as e:
            ws.receive_text()
    assert e.value.reason == "an exec request is a JSON object"


def test_a_runner_reply_nested_too_deep_is_a_protocol_error(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(DEEP[:60_000].encode() + b"\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(ProtocolError, match="not JSON"):
        control._exchange(path, b'{"op": "status"}', timeout=10)
    t.join(10)
    srv.close()
