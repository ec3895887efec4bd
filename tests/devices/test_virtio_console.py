"""virtio-console with ports, driven by the mock driver: the control handshake, data both
ways, back-pressure, hostile control messages, and the Unix-socket host side."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from pyvirt.devices.virtio.console import (
    CONSOLE_PORT,
    DEVICE_ADD,
    DEVICE_READY,
    PORT_NAME,
    PORT_OPEN,
    PORT_READY,
    VIRTIO_CONSOLE_F_MULTIPORT,
    UnixSocketPort,
    VirtioConsole,
)
from pyvirt.errors import ConfigError
from pyvirt.testing.virtio_rig import make_rig

CTRL = struct.Struct("<IHH")


class FakePort:
    def __init__(self) -> None:
        self.connected = False
        self.inbox = bytearray()
        self.sent: list[bytes] = []
        self.accepting = True
        self.closed = False

    def poll(self, want: int) -> bytes:
        data = bytes(self.inbox[:want])
        del self.inbox[:len(data)]
        return data

    def send(self, data: bytes) -> bool:
        if not self.accepting:
            return False
        self.sent.append(data)
        return True

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        self.closed = True


class Guest:
    """The driver side: six queues (port 0, control, port 1), control buffers posted."""

    def __init__(self, port: FakePort) -> None:
        self.port = port
        self.rig = make_rig(VirtioConsole(None, [("data", port)]))
        self.dev: VirtioConsole = self.rig.device
        self.qs = self.rig.drv.init(queues=6)
        self.posted: dict[int, object] = {}
        for _ in range(8):
            self.post_control()

    def post_control(self, size: int = 64) -> None:
        b = self.rig.drv.buffer(size, writable=True)
        self.posted[self.qs[2].add([b])] = b
        self.rig.drv.kick(2)

    def control(self, port: int, event: int, value: int = 0, raw: bytes | None = None) -> None:
        self.qs[3].add([self.rig.drv.buffer(raw if raw is not None else CTRL.pack(port, event, value))])
        self.rig.drv.kick(3)

    def messages(self) -> list[tuple[int, int, int, bytes]]:
        """Control messages the device sent since the last call (buffers re-posted)."""
        out = []
        for head, n in self.qs[2].used_entries():
            buf = self.posted.pop(head)
            data = self.rig.drv.read(buf, n)  # type: ignore[arg-type]
            out.append((*CTRL.unpack(data[:8]), data[8:]))
            self.post_control()
        return out

    def handshake(self) -> list[tuple[int, int, int, bytes]]:
        self.control(0, DEVICE_READY, 1)
        added = self.messages()
        assert added == [(0, DEVICE_ADD, 0, b""), (1, DEVICE_ADD, 0, b"")]
        self.control(0, PORT_READY, 1)
        self.control(1, PORT_READY, 1)
        return self.messages()

    def send(self, q: int, data: bytes) -> None:
        self.qs[q].add([self.rig.drv.buffer(data)])
        self.rig.drv.kick(q)

    def receive_buffer(self, q: int, size: int):
        b = self.rig.drv.buffer(size, writable=True)
        self.qs[q].add([b])
        self.rig.drv.kick(q)
        return b


@pytest.fixture
def guest() -> Guest:
    return Guest(FakePort())


def test_features_and_config(guest: Guest) -> None:
    assert guest.rig.drv.device_features() & VIRTIO_CONSOLE_F_MULTIPORT
    assert guest.rig.drv.config_read(4, 4) == 2                  # max_nr_ports
    assert len(guest.dev.queues) == 6


def test_handshake_names_the_ports(guest: Guest) -> None:
    msgs = guest.handshake()
    assert (0, CONSOLE_PORT, 1, b"") in msgs and (0, PORT_OPEN, 1, b"") in msgs
    assert (1, PORT_NAME, 0, b"data") in msgs
    # open before any host client came: the guest's read waits, its writes are kept
    assert (1, PORT_OPEN, 1, b"") in msgs
    guest.port.connected = True                                  # a host client arrives
    guest.dev.poll()
    assert guest.messages() == []
    guest.port.connected = False                                 # ... and leaves: end-of-file
    guest.dev.poll()
    assert guest.messages() == [(1, PORT_OPEN, 0, b"")]
    guest.control(1, PORT_OPEN, 1)                               # the guest opens, reads EOF,
    guest.control(1, PORT_OPEN, 0)                               # closes: the next open is fresh
    assert guest.messages() == [(1, PORT_OPEN, 1, b"")]


def test_data_both_ways(guest: Guest) -> None:
    guest.handshake()
    guest.control(1, PORT_OPEN, 1)                               # the guest opens /dev/vport1p1
    guest.send(5, b"hello host")                                 # port 1 transmitq
    assert guest.port.sent == [b"hello host"]
    buf = guest.receive_buffer(4, 8)                             # port 1 receiveq
    guest.port.inbox += b"ping from host"
    guest.dev.poll()
    assert guest.rig.drv.read(buf) == b"ping fro"
    assert guest.qs[4].used_entries()[0][1] == 8
    buf2 = guest.receive_buffer(4, 64)                           # the rest waited for a buffer
    assert guest.rig.drv.read(buf2, 6) == b"m host"
    assert guest.dev.stats["bytes_in"] == 14 and guest.dev.stats["bytes_out"] == 10
    guest.send(1, b"to hvc0")                                    # the console port: nobody listens
    assert guest.qs[1].used_entries()[0][1] == 0


def test_congested_host_holds_chains_back(guest: Guest) -> None:
    guest.handshake()
    guest.port.accepting = False
    guest.send(5, b"one")
    guest.send(5, b"two")
    assert guest.port.sent == [] and guest.qs[5].used_entries() == []
    guest.port.accepting = True
    guest.dev.poll()
    assert guest.port.sent == [b"one", b"two"] and len(guest.qs[5].used_entries()) == 2


def test_host_data_waits_until_the_guest_opens_the_port(guest: Guest) -> None:
    guest.handshake()
    buf = guest.receive_buffer(4, 64)
    guest.port.connected = True
    guest.port.inbox += b"early"
    guest.dev.poll()
    assert guest.qs[4].used_entries() == []                      # Linux would drop it now
    guest.port.connected = False                                 # the client even left already
    for _ in range(3):
        guest.dev.poll()
    assert guest.messages() == []                                # still open: data is waiting
    guest.control(1, PORT_OPEN, 1)
    assert guest.qs[4].used_entries()[0][1] == 5 and guest.rig.drv.read(buf, 5) == b"early"
    guest.dev.poll()
    assert guest.messages() == [(1, PORT_OPEN, 0, b"")]          # EOF after the data


def test_host_input_is_bounded(guest: Guest) -> None:
    guest.handshake()
    guest.port.inbox += b"x" * (200 * 1024)
    guest.dev.poll()
    assert len(guest.dev.pending_in[1]) == 64 * 1024 and len(guest.port.inbox) == 136 * 1024


@pytest.mark.parametrize("raw", [b"", b"\x01\x00", CTRL.pack(7, PORT_READY, 1), CTRL.pack(1, 99, 1),
                                 CTRL.pack(0xFFFFFFFF, PORT_OPEN, 1)])
def test_bad_control_messages_are_ignored(guest: Guest, raw: bytes) -> None:
    guest.handshake()
    if raw:
        guest.control(0, 0, raw=raw)
    else:
        guest.qs[3].add([guest.rig.drv.buffer(8, writable=True)])  # no readable bytes at all
        guest.rig.drv.kick(3)
    assert guest.dev.stats["bad_control"] == 1
    assert guest.messages() == []
    assert not guest.rig.bus.stray
    guest.send(5, b"still works")
    assert guest.port.sent == [b"still works"]


def first_input(port: UnixSocketPort) -> bytes:
    """What the port's poll() hands over first (b"" if nothing within a second)."""
    for _ in range(100):
        got = port.poll(100)
        if got:
            return got
        time.sleep(0.01)
    return b""


def test_unix_socket_port(tmp_path: Path) -> None:
    path = tmp_path / "port.sock"
    port = UnixSocketPort(path)
    try:
        assert not port.connected and port.poll(100) == b""
        assert port.send(b"kept: nobody is connected;")
        assert port.send(b"x" * UnixSocketPort.MAX_OUT)         # beyond the bound: dropped
        assert len(port.out) == UnixSocketPort.MAX_OUT
        port.out[26:] = b""
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(path))
        c.sendall(b"from client")
        got = first_input(port)
        assert port.connected and got == b"from client"
        assert port.send(b"to client")
        c.settimeout(5)
        got = b""
        while len(got) < 35:
            got += c.recv(100)
        assert got == b"kept: nobody is connected;to client"
        c.close()
        for _ in range(100):
            port.poll(100)
            if not port.connected:
                break
            time.sleep(0.01)
        assert not port.connected
        c2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # the next client is served too
        c2.connect(str(path))
        c2.sendall(b"second")
        got = first_input(port)
        assert port.connected and got == b"second"
        assert port.poll(100) == b""                  # nothing more: no error, nothing made up
        c2.close()
    finally:
        port.close()
    port.close()                                      # twice: nothing to do
    assert not path.exists()


def test_unix_socket_port_paths(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()                                       # a socket file left by a dead VMM
    UnixSocketPort(stale).close()
    regular = tmp_path / "file"
    regular.write_text("keep")
    with pytest.raises(ConfigError, match="not a socket"):
        UnixSocketPort(regular)
    assert regular.read_text() == "keep"
    with pytest.raises(ConfigError, match="cannot listen"):
        UnixSocketPort(tmp_path / "missing-dir" / "x.sock")


def test_bad_receive_descriptor_found_by_poll_needs_reset_not_a_crash(guest: Guest) -> None:
    """Host input delivered from poll() into a receive buffer outside RAM: the device needs a
    reset; the QueueError does not escape into the run loop (issue 14)."""
    from pyvirt.devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
    from pyvirt.testing.virtq import Buffer
    guest.handshake()
    guest.control(1, PORT_OPEN, 1)                           # the guest opens the port: data flows
    guest.qs[4].add([Buffer(0x1000, 64, True)])             # port 1's receive queue
    guest.port.inbox += b"hello"
    guest.dev.poll()                                          # raised QueueError before
    assert guest.rig.drv.status & STATUS_DEVICE_NEEDS_RESET
    guest.dev.poll()
    assert not guest.rig.bus.stray


def test_control_messages_for_the_guest_are_bounded(guest: Guest) -> None:
    """DEVICE_READY / PORT_READY again and again with no control buffers taken: the queue of
    messages for the guest stays within what a snapshot may hold (issue 14)."""
    from pyvirt.devices.virtio.console import MAX_CONTROL_OUT
    guest.messages()                                          # (take none of the control buffers)
    for _ in range(10):
        guest.qs[2].used_entries()
    for _ in range(300):
        guest.control(0, DEVICE_READY, 1)
        guest.control(1, PORT_READY, 1)
        guest.qs[3].used_entries()                            # (the driver reclaims its buffers)
    assert len(guest.dev.control_out) <= MAX_CONTROL_OUT
    state = guest.dev.save_device()
    assert len(state["control_out"]) <= MAX_CONTROL_OUT
