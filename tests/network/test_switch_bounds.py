"""A VM sending from ever new source addresses cannot grow the switch's MAC table without
bound, push out another port's addresses, or make every wake-up slower (issue 14)."""

from __future__ import annotations

import selectors
import socket
import tempfile
import time
from pathlib import Path

from pyvirt.network import switch as sw
from pyvirt.network.switch import Port, Switch, listen


def mac(n: int) -> bytes:
    return bytes([0x52, 0x54]) + n.to_bytes(4, "big")


def test_mac_table_is_bounded_per_port_and_aging_is_cheap() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        s = Switch(listen(Path(d) / "s.sock"))
        pairs = [socket.socketpair() for _ in range(2)]
        try:
            flood, quiet = Port(pairs[0][0], 1), Port(pairs[1][0], 2)
            for p in (flood, quiet):
                p.sock.setblocking(False)
                s.ports[p.number] = p
                s.sel.register(p.sock, selectors.EVENT_READ, p)
            s._forward(quiet, b"\xff" * 6 + mac(0xFFFF) + b"\x88\xb5hi")
            for i in range(3 * sw.MAX_MACS_PER_PORT):
                s._forward(flood, b"\xff" * 6 + mac(i) + b"\x88\xb5hi")
            assert len(flood.macs) == sw.MAX_MACS_PER_PORT
            assert len(s.macs) == sw.MAX_MACS_PER_PORT + 1
            assert s.macs[mac(0xFFFF)] is quiet                   # the other port's address stays
            assert s.macs[mac(3 * sw.MAX_MACS_PER_PORT - 1)] is flood
            assert mac(0) not in s.macs                            # its own oldest went
            t = time.perf_counter()
            for _ in range(1000):                                  # nothing expired: O(ports)
                s._age()
            assert time.perf_counter() - t < 0.5
            s.aging = 0.0
            time.sleep(0.01)
            s._age()
            assert s.macs == {} and not flood.macs and not quiet.macs
        finally:
            for a, b in pairs:
                a.close()
                b.close()
            s.sel.close()
            s.listener.close()
