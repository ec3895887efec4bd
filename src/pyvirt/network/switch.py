"""An L2 learning switch on a Unix stream socket speaking QEMU's `-netdev stream` framing.

Every connection to the socket is a switch port.  A frame is a 4-byte
big-endian length and that many bytes of Ethernet frame.  The switch:

* learns which port each source MAC address lives behind (entries age out
  after `AGING` seconds, and go when their port does); at most
  `MAX_MACS_PER_PORT` per port (a port sending from new addresses replaces
  its own least recently seen ones, never another port's) and `MAX_MACS` in
  all (an address beyond that is not learned: its frames are flooded).  Each
  port keeps its addresses in the order last seen, so a lookup is one dict
  access and aging looks only at the entries that expired;
* sends a unicast frame for a learned address to that port only, and floods
  broadcast, multicast and unknown unicast frames to every other port; a
  frame never goes back to the port it came from;
* keeps a bounded output buffer per port: a frame for a port that is not
  reading (its buffer holds `MAX_OUT` bytes) is dropped for that port, so a
  slow peer never holds up the others;
* drops a port that breaks the framing (a length of 0, more than
  `MAX_LENGTH`, or a frame shorter than an Ethernet header), with one log
  line, and goes on serving the rest.

Single-threaded: one `selectors` loop.  Run as a process with
`python -m pyvirt.network.switch NAME` (what `pyvirt network create` does):
it then holds a lock on `<NAME>.pid` for as long as it lives, writes
`<NAME>.json` (name, socket, pid, created, ports) and removes its files when
it ends on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("pyvirt.network.switch")

LENGTH = struct.Struct(">I")
MAX_FRAME = 65535              # the longest frame forwarded (pyvirt's StreamBackend takes no more)
MAX_LENGTH = MAX_FRAME + 64    # longer announced lengths break the framing: the port is dropped
MIN_FRAME = 14                 # an Ethernet header
MAX_OUT = 1 << 20              # bytes queued towards one port; beyond that its frames are dropped
AGING = 300.0                  # seconds a learned MAC address stays without traffic from it
MAX_MACS_PER_PORT = 1024       # learned addresses behind one port
MAX_MACS = 16384               # learned addresses in all
READ_SIZE = 256 * 1024


class Port:
    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.number = number
        self.inbuf = bytearray()
        self.out = bytearray()
        self.closed = False
        self.writing = False          # registered for EVENT_WRITE (output is waiting)
        self.macs: OrderedDict[bytes, float] = OrderedDict()     # learned here, least recent first
        self.stats = {"rx_frames": 0, "tx_frames": 0, "tx_dropped": 0}

    def fileno(self) -> int:
        return self.sock.fileno()


class Switch:
    """The switch serving `listener` (a bound, listening Unix stream socket)."""

    def __init__(self, listener: socket.socket, name: str = "switch", max_out: int = MAX_OUT,
                 aging: float = AGING) -> None:
        self.listener = listener
        self.name = name
        self.max_out = max_out
        self.aging = aging
        listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.ports: dict[int, Port] = {}          # by number
        self.macs: dict[bytes, Port] = {}        # learned address -> its port (times: Port.macs)
        self._next = 1
        self._stop = False
        self.on_ports_changed: Callable[[int], None] | None = None

    # -- control --------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to end (from any thread or a signal handler)."""
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def serve_forever(self) -> None:
        try:
            while not self._stop:
                for key, events in self.sel.select(timeout=30.0):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        port: Port = key.data
                        if port.closed:
                            continue
                        if events & selectors.EVENT_READ:
                            self._read(port)
                        if not port.closed and events & selectors.EVENT_WRITE:
                            self._flush(port)
                            self._flush_done(port)
                self._age()
        finally:
            for port in list(self.ports.values()):
                self._drop(port, None)
            self.sel.close()
            self._wake_r.close()
            self._wake_w.close()

    # -- ports ----------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e.strerror)
                return
            sock.setblocking(False)
            port = Port(sock, self._next)
            self._next += 1
            self.ports[port.number] = port
            self.sel.register(sock, selectors.EVENT_READ, port)
            log.info("port %d connected (%d ports)", port.number, len(self.ports))
            self._ports_changed()

    def _drop(self, port: Port, why: str | None) -> None:
        if port.closed:
            return
        port.closed = True
        if why is not None:
            log.warning("port %d dropped: %s", port.number, why)
        try:
            self.sel.unregister(port.sock)
        except (KeyError, ValueError):
            pass
        port.sock.close()
        del self.ports[port.number]
        for mac in port.macs:
            if self.macs.get(mac) is port:
                del self.macs[mac]
        port.macs.clear()
        self._ports_changed()

    def _ports_changed(self) -> None:
        if self.on_ports_changed is not None:
            try:
                self.on_ports_changed(len(self.ports))
            except Exception as e:      # noqa: BLE001 - a state file write must not stop the switch
                log.warning("cannot record the port count: %s", e)

    # -- input ----------------------------------------------------------------------------
    def _read(self, port: Port) -> None:
        try:
            data = port.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(port, f"receive failed: {e.strerror}")
            return
        if not data:
            log.info("port %d disconnected", port.number)
            self._drop(port, None)
            return
        port.inbuf += data
        buf = port.inbuf
        pos = 0
        while len(buf) - pos >= LENGTH.size:
            (n,) = LENGTH.unpack_from(buf, pos)
            if n == 0 or n > MAX_LENGTH or n < MIN_FRAME:
                self._drop(port, f"malformed frame length {n}")
                return
            if len(buf) - pos - LENGTH.size < n:
                break
            frame = bytes(buf[pos + LENGTH.size:pos + LENGTH.size + n])
            pos += LENGTH.size + n
            port.stats["rx_frames"] += 1
            self._forward(port, frame)
        if pos:
            del buf[:pos]

    def _forward(self, src: Port, frame: bytes) -> None:
        if len(frame) > MAX_FRAME:
            return
        now = time.monotonic()
        dst_mac, src_mac = frame[0:6], frame[6:12]
        if not src_mac[0] & 1:                         # a multicast source address is never learned
            self._learn(src, src_mac, now)
        if not dst_mac[0] & 1:
            dst = self.macs.get(dst_mac)
            if dst is not None and now - dst.macs.get(dst_mac, -self.aging - 1) <= self.aging:
                if dst is not src and not dst.closed:
                    self._queue(dst, frame)
                return                                 # (to the sender's own side: nothing to do)
        for port in list(self.ports.values()):
            if port is not src:
                self._queue(port, frame)

    def _learn(self, port: Port, mac: bytes, now: float) -> None:
        old = self.macs.get(mac)
        if old is not None and old is not port:          # the address moved
            old.macs.pop(mac, None)
            del self.macs[mac]
        if mac in port.macs:
            port.macs.move_to_end(mac)
        else:
            if len(port.macs) >= MAX_MACS_PER_PORT:       # its own least recently seen goes
                gone, _ = port.macs.popitem(last=False)
                self.macs.pop(gone, None)
            elif len(self.macs) >= MAX_MACS:
                return                                    # full: not learned (flooded)
            self.macs[mac] = port
        port.macs[mac] = now

    # -- output ---------------------------------------------------------------------------
    def _queue(self, port: Port, frame: bytes) -> None:
        if len(port.out) + LENGTH.size + len(frame) > self.max_out:
            port.stats["tx_dropped"] += 1
            return
        port.out += LENGTH.pack(len(frame))
        port.out += frame
        port.stats["tx_frames"] += 1
        self._flush(port)

    def _flush(self, port: Port) -> None:
        while port.out:
            try:
                n = port.sock.send(port.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._drop(port, f"send failed: {e.strerror}")
                return
            del port.out[:n]
        if port.out and not port.writing:
            self.sel.modify(port.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, port)
            port.writing = True

    def _flush_done(self, port: Port) -> None:
        if not port.out and port.writing and not port.closed:
            self.sel.modify(port.sock, selectors.EVENT_READ, port)
            port.writing = False

    def _age(self) -> None:
        now = time.monotonic()
        for port in self.ports.values():
            macs = port.macs
            while macs:
                mac, t = next(iter(macs.items()))
                if now - t <= self.aging:
                    break
                del macs[mac]
                if self.macs.get(mac) is port:
                    del self.macs[mac]


def listen(path: str | Path) -> socket.socket:
    """A listening Unix stream socket at `path` (a stale socket file there is replaced)."""
    path = str(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, 0o600)
        s.listen(64)
    except BaseException:
        s.close()
        raise
    return s


# -- the switch process -------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from pyvirt.network.manage import network_paths, valid_name, write_json

    ap = argparse.ArgumentParser(prog="python -m pyvirt.network.switch")
    ap.add_argument("name")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s switch {args.name}: %(message)s")
    if not valid_name(args.name):
        log.error("invalid network name %r", args.name)
        return 2
    paths = network_paths(args.name)
    lock = open(paths.pid, "a+")                       # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.error("network %s already has a running switch", args.name)
        return 1
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    created = time.time()

    def record(ports: int) -> None:
        write_json(paths.state, {"name": args.name, "socket": str(paths.sock), "pid": os.getpid(),
                                 "created": created, "ports": ports})

    listener = listen(paths.sock)
    switch = Switch(listener, name=args.name)
    switch.on_ports_changed = record
    record(0)
    signal.signal(signal.SIGTERM, lambda *_: switch.stop())
    signal.signal(signal.SIGINT, lambda *_: switch.stop())
    log.info("serving %s", paths.sock)
    try:
        switch.serve_forever()
    finally:
        listener.close()
        for p in (paths.sock, paths.state, paths.pid):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
