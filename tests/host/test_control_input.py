"""What a control client can make the runner pass on to the guest agent (host/runner.py
`Runner.handle`): no line breaks or other control characters inside a line, and a bounded
backlog while the agent is not listening.  Found by reading the fuzz target fuzz/targets.py
`fuzz_control` drives."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pyvirt.host import control
from pyvirt.host.runner import AGENT_BACKLOG, Runner


class StandIn:
    """The parts of a Runner that `handle` and `send_agent` use; the agent never listens."""

    def __init__(self) -> None:
        self.agent_out = bytearray()
        self.vm: Any = type("V", (), {"board": None, "paused": False, "resume": lambda self: None})()
        self.agent_board = None

    def agent_open(self) -> bool:
        return False

    _handle = Runner.handle

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """As the control server serves one line: parsed, handled, refusals as errors."""
        try:
            parsed = control.parse_request(json.dumps(req).encode())
            reply = self._handle(parsed, lambda _r: None)
        except (control.ProtocolError, control.Refused) as e:
            return {"ok": False, "error": str(e)}
        assert reply is not None
        return {"ok": True}
    send_agent = Runner.send_agent
    _agent_flush = Runner._agent_flush


def test_a_host_name_with_a_line_break_never_reaches_the_agent() -> None:
    r = StandIn()
    for name in ("x\nreboot", "x\rpoweroff", "a b", "", "-x", "x" * 64, 7, None, "\u00e9"):
        reply = r.handle({"op": "hostname", "name": name})
        assert reply["ok"] is False and reply["error"].startswith("hostname: name"), (name, reply)
    assert r.agent_out == b""
    assert r.handle({"op": "hostname", "name": "web-1.a_b"}) == {"ok": True}
    assert r.agent_out == b"hostname web-1.a_b\n"


def test_mac_needs_ascii_digits() -> None:
    r = StandIn()
    assert r.handle({"op": "mac", "iface": "eth\u0663", "address": "52:54:00:00:00:01"})["ok"] is False
    assert r.handle({"op": "mac", "iface": "eth0", "address": "52:54:00:00:00:01\n"})["ok"] is False
    assert r.agent_out == b""
    assert r.handle({"op": "mac", "iface": "eth0", "address": "52:54:00:00:00:01"}) == {"ok": True}


def test_the_agent_backlog_is_bounded_while_the_agent_is_away() -> None:
    r = StandIn()
    replies = [r.handle({"op": "hostname", "name": f"n{i}"}) for i in range(10_000)]
    assert len(r.agent_out) <= AGENT_BACKLOG
    assert replies[0] == {"ok": True}
    assert replies[-1]["ok"] is False and "backlog is full" in replies[-1]["error"]


def test_a_request_nested_too_deep_is_a_protocol_error() -> None:
    """A control line of "[[[[..." (well under the 64 KiB line limit) raised RecursionError out
    of parse_request, past the server's ProtocolError answer, into the runner's loop (found by
    reading while fixing the same in the migration stream)."""
    with pytest.raises(control.ProtocolError, match="one JSON object per line"):
        control.parse_request(b"[" * 5000)
