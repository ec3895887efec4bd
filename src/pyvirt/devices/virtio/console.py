"""virtio-console with multiple ports (virtio 1.2, 5.3 "Console Device").

Port 0 is the console port (Linux's hvc0); ports 1.. are named ports (Linux's
/dev/vportNpM, with /sys/class/virtio-ports/*/name).  Each port has a host
side, a `PortBackend`: a Unix socket server (`UnixSocketPort`), or nothing
(`NullPort`: output is dropped, there is never input).

Queues (VIRTIO_CONSOLE_F_MULTIPORT)::

    0 port 0 receiveq   1 port 0 transmitq   2 control receiveq   3 control transmitq
    4 port 1 receiveq   5 port 1 transmitq   ...   2(N+1)-2, 2(N+1)-1 for port N

Control messages (5.3.6.2), le32 id, le16 event, le16 value: the driver says
DEVICE_READY, the device answers DEVICE_ADD for every port; the driver says
PORT_READY for a port, the device answers CONSOLE_PORT (port 0) or PORT_NAME
(the name follows the message in the same buffer), then PORT_OPEN with the
host side's state, and again whenever it changes.

The host side of a named port is told to the guest as open until a host client
has come and gone (so a guest that opens the port first waits for data instead
of reading end-of-file at once, and its writes are kept for the first client:
`UnixSocketPort` buffers up to `MAX_OUT` bytes); when a client leaves, the port
stays open until everything it sent has gone to the guest, then closes (the
guest reads end-of-file after the data), and opens again once the guest has
closed its end.  Linux drops data that arrives on a port the guest has not
opened, so host data waits in the device (bounded) until the guest opens it.

Guest input is bounded: data from the host is read only while less than
`MAX_PENDING` bytes wait for the guest's receive buffers, and a transmit
chain larger than `MAX_TX_CHAIN` is cut.  Bad control messages are ignored.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import struct
from pathlib import Path
from typing import Any, Protocol

from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.queue import QueueError, SplitQueue
from pyvirt.errors import ConfigError
from pyvirt.fsutil import listen_unix
from pyvirt.state import Schema, blob, boolean, listof, record
from pyvirt.stream import BufferedStream

log = logging.getLogger(__name__)

VIRTIO_ID_CONSOLE = 3
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1

DEVICE_READY, DEVICE_ADD, DEVICE_REMOVE, PORT_READY = 0, 1, 2, 3
CONSOLE_PORT, RESIZE, PORT_OPEN, PORT_NAME = 4, 5, 6, 7
CONTROL = struct.Struct("<IHH")
CONTROL_RX, CONTROL_TX = 2, 3
MAX_PENDING = 64 * 1024          # host bytes waiting for the guest, per port
MAX_TX_CHAIN = 64 * 1024         # bytes taken from one transmit chain
MAX_PORTS = 16
MAX_CONTROL_OUT = 4 * MAX_PORTS + 16   # control messages waiting for the guest (as its state schema allows)
QUEUE_SIZE = 128


class PortBackend(Protocol):
    """The host side of one port."""

    connected: bool

    def poll(self, want: int) -> bytes:
        """Up to `want` bytes from the host (b"" if none now); updates `connected`."""
        ...

    def send(self, data: bytes) -> bool:
        """Queue `data` for the host; False (nothing taken) when the host is not keeping up."""
        ...

    def fileno(self) -> int | None:
        ...

    def close(self) -> None:
        ...


class NullPort:
    """A port with nothing on the host side."""

    connected = False

    def poll(self, want: int) -> bytes:
        return b""

    def send(self, data: bytes) -> bool:
        return True

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class UnixSocketPort:
    """A Unix stream socket the VMM listens on (mode 0600 from the start); one client at a time
    is the host side, served through a `pyvirt.stream.BufferedStream`.  Output while no client
    is connected is kept for the next one (up to MAX_OUT bytes; beyond, dropped).

    `poll()` runs after every CPU slice: it asks the kernel whether the listening socket (or
    the client) has anything with one `poll(2)` of that descriptor, and calls accept() or
    recv() only then -- a non-blocking accept() or recv() with nothing there costs an
    exception in Python, several times the price, on every slice."""

    MAX_OUT = 256 * 1024
    CLOSE_FLUSH_TIMEOUT = 5.0      # seconds close() waits for a client to take the last output

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.server = listen_unix(self.path, backlog=1)   # (a stale socket is replaced, never a live one)
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.path}: {e.strerror}") from None
        self.client: BufferedStream | None = None
        self.out = bytearray()                   # output while no client is connected
        self.connected = False
        self._poller = select.poll()
        self._watched: int | None = None
        self._watch(self.server.fileno())

    def _watch(self, fd: int) -> None:
        """Make `fd` the one descriptor `_ready()` asks about."""
        if self._watched is not None:
            self._poller.unregister(self._watched)
        self._watched = None
        if fd >= 0:                              # (-1: the listener is closed already)
            self._poller.register(fd, select.POLLIN)
            self._watched = fd

    def _ready(self) -> bool:
        """Something to accept or read -- or an end or error, which accept/recv then report."""
        return bool(self._poller.poll(0))

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
        self.connected = False
        self._watch(self.server.fileno())

    def poll(self, want: int) -> bytes:
        if self.client is None:
            if not self._ready():
                return b""
            try:
                conn, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return b""
            self.client = BufferedStream(conn, self.MAX_OUT)
            self.client.queue(self.out)
            self.out.clear()
            self.connected = True
            self._watch(conn.fileno())
        if self.client.flush() is not None or want <= 0:
            if self.client.closed:
                self._drop()
            return b""
        if not self._ready():
            return b""
        data = self.client.recv(want)
        if data is None or isinstance(data, OSError):
            self._drop()                         # the client left
            return b""
        return data

    def send(self, data: bytes) -> bool:
        if self.client is None:
            # nobody listening: kept for the next client, as far as the bound allows
            self.out += data[:max(0, self.MAX_OUT - len(self.out))]
            return True
        if self.client.full():
            self.client.flush()
            if self.client.full():
                return False
        self.client.queue(data)
        if self.client.flush() is not None:
            self._drop()
        return True

    def fileno(self) -> int | None:
        fd = self.client.fileno() if self.client is not None else None
        return fd if fd is not None else self.server.fileno()

    def close(self) -> None:
        client = self.client
        if client is not None and client.sock is not None and client.out:
            # the last output (a command's, at power-off) still goes to the client
            with contextlib.suppress(OSError):
                client.sock.settimeout(self.CLOSE_FLUSH_TIMEOUT)
                client.sock.sendall(client.out)
        self._drop()
        self.server.close()
        try:
            self.path.unlink()
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.debug("cannot remove %s: %s", self.path, e)


class VirtioConsole(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    serves_host = True
    queue_max_size = QUEUE_SIZE

    def __init__(self, console: PortBackend | None = None,
                 ports: list[tuple[str, PortBackend]] | None = None) -> None:
        named = ports or []
        if len(named) + 1 > MAX_PORTS:
            raise ConfigError(f"too many console ports (at most {MAX_PORTS - 1} named ports)")
        self.names = [""] + [n for n, _ in named]
        self.backends: list[PortBackend] = [console or NullPort()] + [b for _, b in named]
        self.num_queues = 2 * (len(self.backends) + 1)
        super().__init__()
        self.device_reset()

    def features(self) -> int:
        return super().features() | VIRTIO_CONSOLE_F_MULTIPORT

    def config(self) -> bytes:
        return struct.pack("<HHII", 0, 0, len(self.backends), 0)

    # -- queues of a port ---------------------------------------------------------------
    @staticmethod
    def rx_queue(port: int) -> int:
        return 0 if port == 0 else 2 * (port + 1)

    def _port_of(self, index: int) -> int:
        return 0 if index < 2 else index // 2 - 1

    def device_reset(self) -> None:
        self.ready = [False] * len(self.backends)       # the driver said PORT_READY
        self.told_open = [False] * len(self.backends)   # what PORT_OPEN last told the driver
        self.guest_open = [False] * len(self.backends)
        self.host_was = [False] * len(self.backends)     # the backend was connected at the last poll
        self.host_gone = [False] * len(self.backends)    # a client left; the guest has not closed since
        self.pending_in = [bytearray() for _ in self.backends]
        self.control_out: list[bytes] = []
        self.stats = {"bytes_in": 0, "bytes_out": 0, "bad_control": 0}

    # -- requests ----------------------------------------------------------------------------
    def process(self, index: int, queue: SplitQueue) -> None:
        if index == CONTROL_TX:
            self._control_tx(queue)
        elif index == CONTROL_RX:
            self._send_control()
        elif index % 2 == 1:
            self._transmit(self._port_of(index), queue)
        else:
            self._deliver(self._port_of(index))

    def _control_tx(self, queue: SplitQueue) -> None:
        while (chain := queue.pop()) is not None:
            msg = queue.gather(chain.readable, CONTROL.size)
            queue.push(chain.head, 0)
            if len(msg) < CONTROL.size:
                self.stats["bad_control"] += 1
                continue
            self._control(*CONTROL.unpack(msg))
        self._send_control()

    def _control(self, port: int, event: int, value: int) -> None:
        if event == DEVICE_READY:
            if value == 1:
                for p in range(len(self.backends)):
                    self._queue_control(CONTROL.pack(p, DEVICE_ADD, 0))
            return
        if not 0 <= port < len(self.backends):
            self.stats["bad_control"] += 1
            return
        if event == PORT_READY:
            if value != 1:
                return                                    # the driver could not add it
            self.ready[port] = True
            if port == 0:
                self._queue_control(CONTROL.pack(0, CONSOLE_PORT, 1))
            else:
                self._queue_control(CONTROL.pack(port, PORT_NAME, 0) + self.names[port].encode())
            self._tell_open(port, force=True)
        elif event == PORT_OPEN:
            self.guest_open[port] = bool(value)
            if value:
                self._deliver(port)                       # what the host sent before the guest opened
            elif self.host_gone[port] and not self.told_open[port]:
                self.host_gone[port] = False              # the guest saw the end: the next open is fresh
                self._tell_open(port)
        else:
            self.stats["bad_control"] += 1

    def _host_open(self, port: int) -> bool:
        # The console port is always open (hvc0 must work without a host client); a named port
        # is, unless a client left and the guest has had everything it sent (module docstring).
        if port == 0 or self.backends[port].connected:
            return True
        return not self.host_gone[port] or bool(self.pending_in[port])

    def _queue_control(self, msg: bytes) -> None:
        """A control message for the guest; a guest that asks for more of them (DEVICE_READY
        and PORT_READY again and again) than it takes has the excess dropped."""
        if len(self.control_out) < MAX_CONTROL_OUT:
            self.control_out.append(msg)
        else:
            self.stats["bad_control"] += 1

    def _tell_open(self, port: int, force: bool = False) -> None:
        state = self._host_open(port)
        if self.ready[port] and (force or state != self.told_open[port]):
            self.told_open[port] = state
            self._queue_control(CONTROL.pack(port, PORT_OPEN, int(state)))

    def _send_control(self) -> None:
        q = self.queues[CONTROL_RX]
        if not q.ready:
            return
        sent = False
        while self.control_out:
            chain = q.pop()
            if chain is None:
                break
            msg = self.control_out[0]
            if chain.writable_len < len(msg):
                q.push(chain.head, 0)                     # too small to carry it: skip the buffer
                self.stats["bad_control"] += 1
                sent = True
                continue
            self.control_out.pop(0)
            q.push(chain.head, q.scatter(chain.writable, msg))
            sent = True
        if sent:
            self.signal_used(CONTROL_RX)

    def _transmit(self, port: int, queue: SplitQueue) -> None:
        backend = self.backends[port]
        while True:
            chain = queue.pop()
            if chain is None:
                return
            data = queue.gather(chain.readable, min(chain.readable_len, MAX_TX_CHAIN))
            if not backend.send(data):
                # The host is not keeping up: hold this chain back until it does.
                queue.unpop()
                return
            self.stats["bytes_out"] += len(data)
            queue.push(chain.head, 0)

    def _deliver(self, port: int) -> None:
        q = self.queues[self.rx_queue(port)]
        pending = self.pending_in[port]
        if not q.ready or not pending or (port != 0 and not self.guest_open[port]):
            return                # (Linux drops what arrives on a port the guest has not opened)
        sent = False
        while pending:
            chain = q.pop()
            if chain is None:
                break
            n = q.scatter(chain.writable, bytes(pending[:chain.writable_len]))
            del pending[:n]
            self.stats["bytes_in"] += n
            q.push(chain.head, n)
            sent = True
        if sent:
            self.signal_used(self.rx_queue(port))

    # -- the host side -------------------------------------------------------------------------
    def poll(self) -> None:
        """Between CPU slices: move host input towards the guest, notice (dis)connections."""
        if not self.live:
            return
        for port, backend in enumerate(self.backends):
            pending = self.pending_in[port]
            data = backend.poll(MAX_PENDING - len(pending))
            if data:
                pending += data
            if self.host_was[port] and not backend.connected:
                self.host_gone[port] = True
            self.host_was[port] = backend.connected
            try:
                self._deliver(port)                 # (the guest's rx descriptors can be bad)
            except QueueError as e:
                self.needs_reset(f"queue {self.rx_queue(port)}: {e}")
                return
            self._tell_open(port)
            tx_index = self.rx_queue(port) + 1
            tx = self.queues[tx_index]
            if tx.ready and tx.has_work():
                try:
                    self._transmit(port, tx)           # chains held back earlier
                    self.signal_used(tx_index)
                except QueueError as e:
                    self.needs_reset(f"queue {tx_index}: {e}")
                    return
        try:
            self._send_control()
        except QueueError as e:
            self.needs_reset(f"queue {CONTROL_RX}: {e}")

    def wait_fds(self) -> list[int]:
        return [fd for b in self.backends if (fd := b.fileno()) is not None]

    def close(self) -> None:
        for b in self.backends:
            b.close()

    def device_state_schema(self) -> Schema:
        n = len(self.backends)
        return record({"ready": listof(boolean, n), "told_open": listof(boolean, n),
                       "guest_open": listof(boolean, n), "host_gone": listof(boolean, n),
                       "pending_in": listof(blob(MAX_PENDING), n),
                       "control_out": listof(blob(4096), 0, MAX_CONTROL_OUT)},
                      optional=("host_gone",))

    def save_device(self) -> dict[str, Any]:
        return {"ready": list(self.ready), "told_open": list(self.told_open),
                "guest_open": list(self.guest_open), "host_gone": list(self.host_gone),
                "pending_in": [bytes(p) for p in self.pending_in],
                "control_out": list(self.control_out)}

    def load_device(self, state: dict[str, Any]) -> None:
        self.ready = list(state["ready"])
        self.told_open = list(state["told_open"])
        self.guest_open = list(state["guest_open"])
        self.host_gone = list(state.get("host_gone", [False] * len(self.backends)))
        self.pending_in = [bytearray(p) for p in state["pending_in"]]
        self.control_out = list(state["control_out"])
