"""Fuzz targets: each `fuzz_NAME(data)` feeds one input to a piece of pyvirt that takes
hostile input, and raises only for a defect (an exception the code must not let out, an
access outside guest RAM, a device's internal error).  What the code is allowed to answer
with (one-line errors, a device that needs a reset) is caught here.  `SEEDS[NAME]()`
gives a few well-formed inputs to start from.  fuzz/run.py runs them under atheris
with memory and time limits; FUZZING.md says what ran and what it found.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if os.environ.get("PYVIRT_FUZZ_TMP"):          # fuzz/run.py's: it removes it (libFuzzer exits without atexit)
    TMP = Path(os.environ["PYVIRT_FUZZ_TMP"])
else:
    TMP = Path(tempfile.mkdtemp(prefix="pyvirt-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    atexit.register(shutil.rmtree, TMP, True)


class Input:
    """Reads numbers and bytes off the front of a fuzz input; zeros once it is spent."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, size: int) -> int:
        return int.from_bytes(self.bytes(size).ljust(size, b"\0"), "little")

    def u8(self) -> int:
        return self.int(1)

    def u16(self) -> int:
        return self.int(2)

    def u32(self) -> int:
        return self.int(4)


class _Internal(logging.Handler):
    """Records log records that carry a traceback: a device's last line of defence caught
    something, which is a defect even though the VM survives it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append(f"{record.getMessage()}: {record.exc_info[1]!r}")


INTERNAL = _Internal()
logging.getLogger("pyvirt").addHandler(INTERNAL)
logging.getLogger("pyvirt").propagate = False


def _no_internal_errors() -> None:
    if INTERNAL.seen:
        seen = list(INTERNAL.seen)
        INTERNAL.seen.clear()
        raise AssertionError(f"internal error caught by a last line of defence: {seen[0]}")


# -- virtio devices through the mock driver -------------------------------------------------
def _rig(device: Any, queues: int) -> tuple[Any, list[Any]]:
    from pyvirt.testing.virtio_rig import make_rig

    rig = make_rig(device, ram_size=1 << 20)
    qs = rig.drv.init(queues=queues, queue_size=16)
    return rig, qs


def _drive(inp: Input, rig: Any, qs: list[Any], feed: Callable[[bytes], None] | None) -> None:
    """Play a hostile guest (and a host peer through `feed`) with the ops the input spells."""
    from pyvirt.devices.virtio import mmio as regs

    drv, dev, bus = rig.drv, rig.device, rig.bus
    ram, end = bus.ram_base, bus.ram_end
    steps = 0
    while inp.more() and steps < 64:
        steps += 1
        op = inp.u8() % 13
        q = qs[inp.u8() % len(qs)]
        try:
            if op == 0:                      # a well-formed chain with fuzzed contents
                bufs = []
                for _ in range(1 + inp.u8() % 4):
                    n = inp.u16() % 2048
                    if inp.u8() & 1:
                        bufs.append(drv.buffer(n, writable=True))
                    else:
                        bufs.append(drv.buffer(inp.bytes(n)))
                q.add(bufs, indirect=bool(inp.u8() & 1))
            elif op == 1:                    # any descriptor, addresses mostly in RAM
                addr = ram + inp.u32() % (end - ram) if inp.u8() & 3 else inp.int(8)
                q.write_desc(inp.u8() % q.size, addr, inp.u32() % (1 << 17), inp.u16() & 7, inp.u16())
            elif op == 2:
                q.publish(inp.u16())
            elif op == 3:
                q.set_avail_idx(inp.u16())
            elif op == 4:
                drv.kick(q.index if inp.u8() & 3 else inp.u16())
            elif op == 5:
                poll = getattr(dev, "poll", None)
                if callable(poll):
                    poll()
            elif op == 6:                    # any register write (the transport)
                bus.write(drv.base + (inp.u16() % 0x200), 4, inp.u32())
            elif op == 7:
                size = (1, 2, 4, 8)[inp.u8() % 4]
                bus.read(drv.base + (inp.u16() % 0x200) // size * size, size)
            elif op == 8:                    # rewrite guest RAM (buffers, rings) under the device
                addr = ram + inp.u32() % (end - ram)
                data = inp.bytes(inp.u8())
                bus.write_bytes(addr, data[:max(0, end - addr)])
            elif op == 9:
                drv.ack_interrupt()
            elif op == 10:
                q.set_used_event(inp.u16())
            elif op == 11:
                if feed is not None:
                    feed(inp.bytes(inp.u16() % 4096))
            elif op == 12:
                size = (1, 2, 4, 8)[inp.u8() % 4]
                off = regs.CONFIG + (inp.u8() // size * size)
                bus.write(drv.base + off, size, inp.int(size))
        except (MemoryError, AssertionError, ValueError, IndexError):
            # the mock driver's own limits (its allocator, free descriptors): not the device's
            break
    if bus.stray:
        raise AssertionError(f"the device touched memory outside RAM: {bus.stray[:3]}")
    _no_internal_errors()


def fuzz_virtio_blk(data: bytes) -> None:
    from pyvirt.devices.virtio.blk import VirtioBlk
    from pyvirt.testing.fakes import MemoryBlockBackend

    inp = Input(data)
    rig, qs = _rig(VirtioBlk(MemoryBlockBackend(size=64 << 10), serial="fuzz"), 1)
    _drive(inp, rig, qs, None)


def fuzz_virtio_net(data: bytes) -> None:
    from pyvirt.devices.virtio.net import VirtioNet

    class Peer:
        def __init__(self) -> None:
            self.inbox: list[bytes] = []
            self.link_up = True

        def send(self, frame: bytes) -> bool:
            return True

        def flush(self) -> None:
            pass

        def recv(self, limit: int) -> list[bytes]:
            out, self.inbox = self.inbox[:limit], self.inbox[limit:]
            return out

        def fileno(self) -> int | None:
            return None

        def close(self) -> None:
            pass

    peer = Peer()
    inp = Input(data)
    rig, qs = _rig(VirtioNet(peer, b"\x52\x54\x00\x12\x34\x56"), 2)
    def feed(frame: bytes) -> None:
        if frame[:1] == b"\xff":            # the link goes down or up
            peer.link_up = not peer.link_up
        elif len(peer.inbox) < 64:
            peer.inbox.append(frame)

    _drive(inp, rig, qs, feed)


def fuzz_virtio_console(data: bytes) -> None:
    from pyvirt.devices.virtio.console import VirtioConsole

    class Port:
        def __init__(self) -> None:
            self.connected = True
            self.inbox = bytearray()

        def poll(self, want: int) -> bytes:
            out = bytes(self.inbox[:want])
            del self.inbox[:len(out)]
            return out

        def send(self, data: bytes) -> bool:
            return True

        def fileno(self) -> int | None:
            return None

        def close(self) -> None:
            pass

    port = Port()
    inp = Input(data)
    rig, qs = _rig(VirtioConsole(None, [("data", port)]), 6)
    _drive(inp, rig, qs, lambda b: port.inbox.extend(b) if len(port.inbox) < 1 << 16 else None)


def fuzz_virtio_rng(data: bytes) -> None:
    from pyvirt.devices.virtio.rng import VirtioRng

    inp = Input(data)
    rig, qs = _rig(VirtioRng(source=lambda n: bytes(n)), 1)
    _drive(inp, rig, qs, None)


def fuzz_virtio_mmio(data: bytes) -> None:
    """The transport's registers from reset, in any order (no driver set-up first)."""
    from pyvirt.devices.virtio.rng import VirtioRng
    from pyvirt.testing.virtio_rig import make_rig

    inp = Input(data)
    rig = make_rig(VirtioRng(source=lambda n: bytes(n)), ram_size=1 << 20)
    bus, base = rig.bus, rig.drv.base
    for _ in range(256):
        if not inp.more():
            break
        size = (1, 2, 4, 8)[inp.u8() % 4]
        off = inp.u16() % 0x200 // size * size
        if inp.u8() & 1:
            bus.write(base + off, size, inp.int(size))
        else:
            bus.read(base + off, size)
    if bus.stray:
        raise AssertionError(f"the device touched memory outside RAM: {bus.stray[:3]}")
    _no_internal_errors()


# -- virtio-vsock: a hostile guest and hostile host clients --------------------------------------
class _VsockHost:
    """backends/vsock.py's UnixVsockBackend with its listening socket swapped for a queue of
    socketpairs: hostile host clients (their CONNECT lines and data fuzzed) go through the
    real handshake code and `HostStream`s; a guest connecting to host port P gets a
    socketpair when P is odd (an even port has nobody listening)."""

    def __init__(self) -> None:
        import socket

        from pyvirt.backends.vsock import UnixVsockBackend

        self.socket = socket
        self.pending: list[Any] = []                 # server ends waiting in the "backlog"
        self.peers: list[Any] = []                   # the host programs' ends
        self.all: list[Any] = []
        host = self

        class Server:
            def accept(self) -> tuple[Any, None]:
                if not host.pending:
                    raise BlockingIOError
                return host.pending.pop(0), None

            def fileno(self) -> int:
                return -1

            def close(self) -> None:
                pass

        self.backend = UnixVsockBackend.__new__(UnixVsockBackend)
        self.backend.path = TMP / "vsock"
        self.backend.clock = lambda: self.now
        self.backend.server = Server()
        self.backend.handshakes = []
        self.backend.connect = self.connect        # type: ignore[method-assign]
        self.now = 0.0

    def pair(self) -> tuple[Any, Any]:
        a, b = self.socket.socketpair()
        b.setblocking(False)
        self.all += [a, b]
        self.peers.append(b)
        return a, b

    def client(self, first: bytes) -> None:
        if len(self.pending) < 32:
            a, b = self.pair()
            self._send(b, first)
            self.pending.append(a)

    def connect(self, port: int) -> Any:
        from pyvirt.backends.vsock import HostStream

        if port % 2 == 0 or len(self.all) > 512:
            return None
        a, _ = self.pair()
        return HostStream(a)

    @staticmethod
    def _send(s: Any, data: bytes) -> None:
        try:
            s.send(data)
        except OSError:
            pass

    def poke(self, which: int, action: int, data: bytes) -> None:
        """A host program writes, reads, half-closes or closes its end."""
        if not self.peers:
            return
        s = self.peers[which % len(self.peers)]
        try:
            if action == 0:
                self._send(s, data)
            elif action == 1:
                s.recv(1 << 16)
            elif action == 2:
                s.shutdown(self.socket.SHUT_WR)
            else:
                s.close()
        except OSError:
            pass

    def close(self) -> None:
        for s in self.all:
            s.close()


def fuzz_virtio_vsock(data: bytes) -> None:
    """A hostile guest driving virtio-vsock (any queue op of `_drive`, and through the feed,
    TX packets with fuzzed header fields on a few ports, RX buffers of fuzzed sizes), and
    hostile host programs on the other side (CONNECT lines, data, half-closes, closes,
    time passing).  Defects: as for every device, and a connection, buffer or control
    queue beyond its bound."""
    from pyvirt.backends.vsock import MAX_HANDSHAKES
    from pyvirt.devices.virtio.vsock import (
        BUF_ALLOC,
        HDR,
        HDR_SIZE,
        HOST_CID,
        MAX_GUEST_CONNECTIONS,
        MAX_HOST_CONNECTIONS,
        MAX_PKT_DATA,
        MAX_STRAY_RST,
        VirtioVsock,
    )
    from pyvirt.testing.virtio_rig import make_rig
    from pyvirt.testing.virtq import Buffer

    host = _VsockHost()
    try:
        dev = VirtioVsock(host.backend, 3, clock=lambda: host.now)
        rig = make_rig(dev, ram_size=2 << 20)
        qs = rig.drv.init(queues=3, queue_size=16)
        rx, tx, evt = qs
        bus, drv = rig.bus, rig.drv
        rx_pool = [drv.buffer(HDR_SIZE + 4096, writable=True) for _ in range(6)]
        scratch = drv.alloc(HDR_SIZE + MAX_PKT_DATA + 16)
        ports = [1024, 1025, 7, 0, 0xFFFF_FFFF, 1 << 30, 3, 5]

        def feed(b: bytes) -> None:
            f = Input(b)
            what = f.u8() % 8
            for q in qs:
                q.used_entries()                     # reclaim what the device gave back
            if what <= 2:                            # a TX packet with fuzzed header fields
                kind = f.u8()
                src_cid = 3 if kind & 1 else f.int(8)
                dst_cid = HOST_CID if kind & 2 else f.int(8)
                sp, dp = ports[f.u8() % 8], ports[f.u8() % 8]
                op, typ = f.u8() % 9, 1 if kind & 4 else f.u16()
                flags, buf_alloc, fwd_cnt = f.u32(), f.u32(), f.u32()
                body = f.bytes(f.u16() % (MAX_PKT_DATA + 8))
                length = len(body) if kind & 8 else f.u32()
                pkt = HDR.pack(src_cid, dst_cid, sp, dp, length, typ, op, flags, buf_alloc, fwd_cnt) + body
                bus.write_bytes(scratch, pkt)
                cut = min(len(pkt), HDR_SIZE if kind & 16 else len(pkt))
                bufs = [Buffer(scratch, cut)] + ([Buffer(scratch + cut, len(pkt) - cut)] if cut < len(pkt) else [])
                tx.add(bufs)
                drv.kick(1)
            elif what == 3:                          # receive buffers of fuzzed sizes
                for i in range(1 + f.u8() % 6):
                    b = rx_pool[i]
                    rx.add([Buffer(b.addr, f.u16() % b.length, True)])
                evt.add([Buffer(rx_pool[5].addr, f.u8() % 8, True)])
                drv.kick(0)
            elif what == 4:                          # a host program connects
                host.client(f.bytes(f.u8() % 40))
            elif what == 5:
                host.poke(f.u8(), f.u8() % 4, f.bytes(f.u16()))
            elif what == 6:
                host.now += f.u8() / 16
            else:
                dev.load_device(dev.save_device())   # a restore: the reset event
        _drive(Input(data), rig, qs, feed)
        guest_opened = sum(1 for c in dev.conns.values() if c.from_guest)
        if guest_opened > MAX_GUEST_CONNECTIONS or len(dev.conns) - guest_opened > MAX_HOST_CONNECTIONS \
                or len(dev.stray_rst) > MAX_STRAY_RST \
                or len(host.backend.handshakes) > MAX_HANDSHAKES:
            raise AssertionError(f"{len(dev.conns)} connections, {len(dev.stray_rst)} RSTs, "
                                 f"{len(host.backend.handshakes)} handshakes")
        for c in dev.conns.values():
            if len(c.out) > BUF_ALLOC or len(c.ctrl) > 8:
                raise AssertionError(f"connection {c.guest_port}: {len(c.out)} bytes, {c.ctrl[:9]}")
    finally:
        host.close()


def _vsock_seeds() -> Iterator[bytes]:
    from pyvirt.devices.virtio.vsock import OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN

    def pkt(op: int, sp: int, dp: int, body: bytes = b"", flags: int = 0) -> bytes:
        f = bytes([0, 1 | 2 | 4 | 8, sp, dp, op]) + struct.pack("<III", flags, 1 << 16, 0)
        f += struct.pack("<H", len(body)) + body
        return bytes([11, 0]) + struct.pack("<H", len(f)) + f

    rx = bytes([11, 0, 15, 0, 3, 5]) + struct.pack("<6H", *[4139] * 6) + bytes([8])
    # the guest connects to host port 1025 (odd: someone listens), sends data, shuts down
    yield rx + pkt(OP_REQUEST, 0, 1) + pkt(OP_RW, 0, 1, b"hello") + pkt(OP_SHUTDOWN, 0, 1, flags=3) \
        + bytes([5, 0])
    # a host program connects to guest port 1024, the guest answers, data flows back
    conn = b"CONNECT 1024\n"
    yield rx + bytes([11, 0, 2 + len(conn), 0, 4, len(conn)]) + conn + bytes([5, 0]) + rx \
        + pkt(OP_RESPONSE, 0, 5) + bytes([11, 0, 9, 0, 5, 0, 0, 4, 0]) + b"data" + bytes([5, 0]) + rx


# -- qcow2 ------------------------------------------------------------------------------------
def fuzz_qcow2(data: bytes) -> None:
    """The image is the input's tail; its head spells reads, writes, discards and flushes."""
    from pyvirt.backends.qcow2 import Qcow2Backend
    from pyvirt.errors import ImageError

    inp = Input(data)
    nops = inp.u8() % 16
    ops = [(inp.u8() % 5, inp.u32(), inp.u16()) for _ in range(nops)]
    path = TMP / "img.qcow2"
    path.write_bytes(data[inp.pos:])
    try:
        b = Qcow2Backend(path, read_only=bool(nops & 1) and False, open_backing_file=False)
    except ImageError:
        return
    try:
        for op, off, n in ops:
            off %= max(b.size, 1)
            n = min(n, b.size - off)
            try:
                if op == 0:
                    b.readinto(off, memoryview(bytearray(n)))
                elif op == 1:
                    b.write(off, bytes([op + 1]) * n)
                elif op == 2:
                    b.discard(off - off % 512, n - n % 512)
                elif op == 3:
                    b.write_zeroes(off - off % 512, n - n % 512)
                else:
                    b.flush()
            except OSError:                  # ImageCorruptError (EIO), EINVAL: fail the request
                continue
    finally:
        try:
            b.close()
        except OSError:
            pass


def _qcow2_seeds() -> Iterator[bytes]:
    from pyvirt.backends.qcow2 import Qcow2Backend
    from pyvirt.backends.qcow2_tools import create_qcow2

    for cs in (512, 4096, 65536):
        p = TMP / f"seed-{cs}.qcow2"
        p.unlink(missing_ok=True)
        create_qcow2(p, 1 << 20, cluster_size=cs)
        b = Qcow2Backend(p)
        b.write(0, b"x" * 3000)
        b.write(cs * 5, b"y" * 700)
        b.close()
        ops = bytes([4]) + struct.pack("<BIH", 0, 0, 4096) + struct.pack("<BIH", 1, 100, 5000) \
            + struct.pack("<BIH", 2, 0, 8192) + struct.pack("<BIH", 4, 0, 0)
        yield ops + p.read_bytes()


# -- snapshot state ---------------------------------------------------------------------------
_BOARD: Any = None
_STATE: Any = None


def _board() -> tuple[Any, Any]:
    global _BOARD, _STATE
    if _BOARD is None:
        from pyvirt.backends.char import BufferBackend
        from pyvirt.spec import make_spec
        from pyvirt.vmm.resources import build_board

        code = struct.pack("<I", 0x0000006F)
        ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 243, 1,
                           0x8000_0000, 64, 0, 0, 64, 56, 1, 64, 0, 0)
        phdr = struct.pack("<IIQQQQQQ", 1, 5, 120, 0x8000_0000, 0x8000_0000, len(code), len(code), 0x1000)
        (TMP / "fw.elf").write_bytes(ehdr + phdr + code)
        (TMP / "d.img").write_bytes(bytes(1 << 20))
        spec = make_spec(bios=str(TMP / "fw.elf"), memory=16 << 20, disks=[{"path": TMP / "d.img"}],
                         rng=True)
        _BOARD = build_board(spec, BufferBackend())
        from pyvirt.state import encode_bytes
        _STATE = json.loads(json.dumps(_BOARD.save_state(), default=encode_bytes))
    return _BOARD, _STATE


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def fuzz_snapshot_state(data: bytes) -> None:
    """A board's saved state with values swapped for hostile ones where the input says, then
    checked (vmm/snapcheck) and loaded, as `load_snapshot` does."""
    import copy

    from pyvirt.errors import ConfigError, PyvirtError
    from pyvirt.vmm.snapcheck import check_state

    board, saved = _board()
    state = copy.deepcopy(saved)
    paths = list(_paths(state))[1:]
    inp = Input(data)
    values: list[Any] = [-1, 0, 1, 1 << 64, -(1 << 63), 2 ** 31, "", "x" * 300, [], {}, None, True,
                         1.5, [0] * 70, "AAAA", {"a": 1}]
    for _ in range(min(8, len(data) // 3)):
        path = paths[inp.u16() % len(paths)]
        kind = inp.u8()
        value: Any = values[kind % len(values)] if kind < 128 else inp.int(1 + kind % 9) - (1 << 8 * (kind % 9))
        node: Any = state
        for k in path[:-1]:                  # (an earlier swap may have cut the path)
            ok = isinstance(node, dict) and k in node or isinstance(node, list) and isinstance(k, int) \
                and k < len(node)
            node = node[k] if ok else None
        if isinstance(node, dict) or isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
            if kind == 255 and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    try:
        checked = check_state(board, state)
    except ConfigError:
        return
    try:
        board.load_state(checked)
    except (ValueError, KeyError, TypeError, IndexError, PyvirtError):
        return                               # load_snapshot turns these into one ConfigError
    finally:
        board.load_state(check_state(board, saved))


def _snapshot_seeds() -> Iterator[bytes]:
    yield b"\x00\x00\x01"
    yield bytes(range(48))


# -- live migration: the incoming side --------------------------------------------------------
_MIG_TOKEN = "fuzz-token"


def _mig_spec() -> dict[str, Any]:
    _board()
    if not (TMP / "m.img").exists():
        (TMP / "m.img").write_bytes(bytes(1 << 20))
    return {"memory": 16 << 20, "bios": str(TMP / "fw.elf"), "disks": [{"path": str(TMP / "m.img")}],
            "rng": True}


def _mig_frames(inp: Input) -> bytes:
    """A stream of frames the input picks among the real ones (greeting, spec, pages, the real
    machine state, COMPLETE, GO, ABANDON), with fuzzed fields, lying lengths and raw frames."""
    import zstandard

    from pyvirt.state import encode_bytes
    from pyvirt.vmm import migration as m

    _, state = _board()
    cctx = zstandard.ZstdCompressor(level=1)
    out = bytearray()
    for _ in range(1 + inp.u8() % 12):
        kind = inp.u8() % 10
        if kind == 0:
            hello: dict[str, Any] = {"protocol": m.PROTOCOL, "version": m.VERSION, "token": _MIG_TOKEN}
            v = inp.u8()
            if v & 1:
                hello[("protocol", "version", "token", "cold")[(v >> 1) % 4]] = \
                    [None, 2, "x", True, [], {"a": 1}, 1 << 70, "fuzz-token\0"][(v >> 3) % 8]
            body = json.dumps(hello).encode()
            out += m.HEADER.pack(m.HELLO, len(body)) + body
        elif kind == 1:
            spec: dict[str, Any] = _mig_spec()
            v = inp.u8()
            if v & 1:
                key = ["memory", "cpus", "bios", "disks", "nets", "ports", "vsock", "shares", "kernel",
                       "append", "rng", "engine"][(v >> 1) % 12]
                spec[key] = [None, 1, -1, 64 << 30, "/etc/passwd", [{"path": "/etc/passwd"}], [{"backend": "tap"}],
                             [{"name": "x", "socket": "/tmp/s"}], {"cid": 1 << 40}, "a\0b", [1], {"a": 1},
                             str(TMP / "m.img"), [{"path": str(TMP / "../m.img")}], 17 << 20, "x" * 5000][(v >> 4) % 16]
            body = json.dumps(spec).encode()
            out += m.HEADER.pack(m.SPEC, len(body)) + body
        elif kind == 2:                          # PAGES: indexes and contents from the input
            count = inp.u8() % 70
            pages = [inp.u32() if inp.u8() & 1 else inp.u16() for _ in range(min(count, 8))]
            pages += [i for i in range(count - len(pages))]
            raw = struct.pack(f"<I{len(pages)}I", count if inp.u8() & 7 else inp.u32(), *pages)
            raw += bytes([inp.u8()]) * (4096 * len(pages) - inp.u8() % 3)
            body = cctx.compress(raw)
            out += m.HEADER.pack(m.PAGES, len(body)) + body
        elif kind == 3:                          # STATE: the real one, cut or bent, or garbage
            how = inp.u8() % 4
            raw = json.dumps(state, default=encode_bytes).encode()
            if how == 1:
                raw = raw[:inp.u16() % len(raw)]
            elif how == 2:
                at = inp.u16() % len(raw)
                raw = raw[:at] + inp.bytes(inp.u8() % 16) + raw[at + inp.u8() % 8:]
            elif how == 3:
                raw = inp.bytes(inp.u8())
            body = cctx.compress(raw)
            out += m.HEADER.pack(m.STATE, len(body)) + body
        elif kind in (4, 5, 6):
            out += m.HEADER.pack((m.COMPLETE, m.GO, m.ABANDON)[kind - 4], 0)
        elif kind == 7:                          # a bomb: a frame that inflates beyond its limit
            body = cctx.compress(bytes((m.MAX_PAGES_RAW, m.MAX_STATE)[inp.u8() & 1] + 1 + inp.u8()))
            out += m.HEADER.pack((m.PAGES, m.STATE)[inp.u8() & 1], len(body)) + body
        else:                                    # a raw frame: any type, a length that may lie
            body = inp.bytes(inp.u8()) if kind == 8 else b"[" * inp.u16()   # (or JSON nested deep)
            out += m.HEADER.pack(inp.u8() % 12, len(body) if inp.u8() & 1 else inp.u32()) + body
    return bytes(out)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


_MIG_DISK: dict[str, int] = {}                   # the shared disk's inode, from the first input on


def fuzz_migration(data: bytes) -> None:
    """A hostile migration source: the stream (first byte 0: raw bytes; 1: frames built by
    `_mig_frames`) goes through `accept_handshake` (the greeting, the spec checked by
    pyvirtd's `trusted_spec`) and `receive_machine` (pages, disk blocks, state, COMPLETE/GO) on a socketpair.  Only a one-line
    MigrationError may come out (or a VM, if the stream was a whole good one); nothing may be
    written outside the new VM's RAM (the directory's files and the shared disk are checked),
    no descriptor may stay open, and the stream's frame and inflation limits hold memory."""
    import hashlib
    import socket
    import threading

    from pyvirt.backends.char import BufferBackend
    from pyvirt.host.migration import trusted_spec
    from pyvirt.vmm.migration import MigrationError, accept_handshake, receive_machine

    if not data:
        return
    _board()
    stream = _mig_frames(Input(data[1:])) if data[0] & 1 else data[1:]
    _mig_spec()                                  # (makes the shared disk on the first input)
    inode = (TMP / "m.img").stat().st_ino
    if _MIG_DISK.setdefault("inode", inode) != inode:
        raise AssertionError("the shared disk was removed and made again since an earlier input")
    before = sorted(p for p in TMP.rglob("*") if p.is_file())
    disk = hashlib.sha256((TMP / "m.img").read_bytes()).digest()
    vm_dir = TMP / "incoming"
    vm_dir.mkdir(exist_ok=True)
    allow = [(TMP / "m.img").resolve(), (TMP / "fw.elf").resolve()]
    fds = _fds()
    a, b = socket.socketpair()

    def source() -> None:
        try:
            a.sendall(stream)
            a.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    t = threading.Thread(target=source, daemon=True)
    t.start()
    vm = None
    try:
        # pyvirtd's half (the greeting and the spec through trusted_spec), then the runner's
        greeting: dict[str, Any] = {}
        spec = accept_handshake(b, _MIG_TOKEN, lambda s, c: trusted_spec(s, vm_dir, allow, c), 5, greeting)
        vm = receive_machine(b, spec, BufferBackend(limit=1 << 16), 5, greeting.get("disks"))
    except MigrationError as e:
        if "\n" in str(e):
            raise AssertionError(f"a multi-line error: {e!r}") from None
    finally:
        if vm is not None:
            vm.close()
            for p in vm_dir.glob("disk*"):      # (a whole good stream with disk copies made them)
                p.unlink()
        b.close()
        t.join()
        a.close()
    after = sorted(p for p in TMP.rglob("*") if p.is_file())
    if after != before:
        raise AssertionError(f"files appeared or went: {sorted(set(after) ^ set(before))[:5]}")
    if hashlib.sha256((TMP / "m.img").read_bytes()).digest() != disk:
        raise AssertionError("the shared disk changed")
    if _fds() != fds:
        raise AssertionError(f"descriptors open before {fds}, after {_fds()}")


def _migration_seeds() -> Iterator[bytes]:
    """A whole real stream (what `Migration` sends for the snapshot target's board: greeting,
    spec, the non-zero pages, state, COMPLETE, GO), and the same as structured frames."""
    import zstandard

    from pyvirt.state import encode_bytes
    from pyvirt.vmm import migration as m

    board, state = _board()
    cctx = zstandard.ZstdCompressor(level=1)

    def frame(kind: int, body: bytes = b"") -> bytes:
        return m.HEADER.pack(kind, len(body)) + body

    ram = board.bus.ram if hasattr(board.bus, "ram") else None
    pages = m.encode_pages(ram, m.nonzero_pages(ram, 16 << 20)[:64], cctx) if ram is not None \
        else cctx.compress(struct.pack("<II", 1, 0) + bytes(4096))
    yield b"\0" + frame(m.HELLO, json.dumps({"protocol": m.PROTOCOL, "version": m.VERSION,
                                             "token": _MIG_TOKEN}).encode()) \
        + frame(m.SPEC, json.dumps(_mig_spec()).encode()) + frame(m.PAGES, pages) \
        + frame(m.STATE, cctx.compress(json.dumps(state, default=encode_bytes).encode())) \
        + frame(m.COMPLETE) + frame(m.GO)
    yield bytes([1, 5, 0, 0, 1, 0, 2, 1, 0, 0, 0, 1, 0x55, 0, 3, 0, 4, 5])
    yield bytes([1, 4, 0, 0, 1, 0, 2, 2, 1, 9, 0, 0, 0, 0, 1, 0, 1, 0, 7, 1, 0, 1])


# -- archive import ---------------------------------------------------------------------------
def fuzz_archive(data: bytes) -> None:
    """An export archive: the input is its tar stream (compressed here), or with a first byte
    of 1 the archive file itself."""
    import shutil

    import zstandard

    from pyvirt.host.archive import ArchiveError, unpack

    if not data:
        return
    if data[0] == 1:
        raw = data[1:]
    else:
        tar = _structured_archive(Input(data[1:])) if data[0] == 2 else data[1:]
        raw = zstandard.ZstdCompressor(level=1).compress(tar)
    (TMP / "a.tar.zst").write_bytes(raw)
    dest = TMP / "unpacked"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        unpack(TMP / "a.tar.zst", dest)
    except ArchiveError as e:
        if "\n" in str(e):
            raise AssertionError(f"a multi-line error: {e!r}") from None
        if dest.exists():
            raise AssertionError("a refused archive left its directory behind") from None
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _structured_archive(inp: Input) -> bytes:
    """A tar stream whose manifest and members the input chooses among the names, sizes and
    snapshot files archive.py checks (so inputs get past its first checks)."""
    import tarfile

    from pyvirt.host.archive import MANIFEST, SNAP_MANIFEST, SNAP_RAM, SNAP_STATE

    names = [MANIFEST, "disks/disk0.img", "disks/disk1.img", "boot/kernel", SNAP_MANIFEST, SNAP_STATE, SNAP_RAM,
             "disks/../x", "/etc/passwd", "disks/.hidden", "other/x", "disks/a\nb"]
    members: dict[str, bytes] = {}
    for _ in range(1 + inp.u8() % 6):
        name = names[inp.u8() % len(names)]
        if name == SNAP_MANIFEST and inp.u8() & 1:
            body = json.dumps({"format": "pyvirt-snapshot", "version": inp.u8() % 3,
                               "files": {"state.json": {}, "ram": {}}, "disks": [{"kind": "frozen",
                               "path": "disks/disk0.img"}], "spec": {"disks": [{"path": "disks/disk0.img"}]}}).encode()
        else:
            body = inp.bytes(inp.u8())
        members[name] = body
    declared = {n: len(b) + (inp.u8() % 3 == 0) * inp.u16() for n, b in members.items() if n != MANIFEST}
    m: dict[str, Any] = {"format": "pyvirt-export", "version": 1, "spec": {"memory": 64 << 20}, "members": declared}
    if inp.u8() & 1:
        m["snapshot"] = ["s1", "", "a/b", 5][inp.u8() % 4]
    out = io.BytesIO()
    kinds = [tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE]
    with tarfile.open(fileobj=out, mode="w", format=(tarfile.PAX_FORMAT, tarfile.GNU_FORMAT)[inp.u8() & 1]) as t:
        for name, body in [(MANIFEST, members.pop(MANIFEST, json.dumps(m).encode())), *members.items()]:
            ti = tarfile.TarInfo(name)
            ti.type = kinds[inp.u8() % len(kinds)] if inp.u8() % 4 == 0 else tarfile.REGTYPE
            ti.size = len(body) if ti.type == tarfile.REGTYPE else 0
            t.addfile(ti, io.BytesIO(body) if ti.type == tarfile.REGTYPE else None)
    return out.getvalue()


def _archive_seeds() -> Iterator[bytes]:
    import tarfile

    from pyvirt.host.archive import MANIFEST

    def tar(members: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
            for name, body in members.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(body)
                t.addfile(ti, io.BytesIO(body))
        return out.getvalue()

    disk = bytes(4096) + b"data" * 100
    m = {"format": "pyvirt-export", "version": 1, "spec": {"memory": 64 << 20, "disks": [{"path": "disks/disk0.img"}]},
         "members": {"disks/disk0.img": len(disk)}}
    yield b"\0" + tar({MANIFEST: json.dumps(m).encode(), "disks/disk0.img": disk})
    yield b"\0" + tar({MANIFEST: json.dumps(m).encode()})
    yield b"\2" + bytes([2, 1, 40]) + b"x" * 40 + bytes([4, 1]) + bytes(8)
    yield b"\2" + bytes([3, 4, 1, 5, 16]) + b"{}" * 8 + bytes([6, 64]) + bytes(64) + bytes(12)


# -- OCI images: layouts, docker archives, layer tars ----------------------------------------------
_OCI_NAMES = ["a", "a/b", "etc/passwd", "etc/group", "etc", "l", "l/x", "d/../x", "../x", "/abs", "./a//b",
              ".wh.a", "a/.wh..wh..opq", ".wh..wh..opq", "a/.wh.b", "h", "dev", "x" * 300, "a\\b", "\udcff",
              "d/" * 60 + "f", ""]
# Absolute link targets point into a victim directory of the harness's own, never at the
# host's "/": a defect that follows a link out of the root (a chmod, say) must show up as a
# changed victim, not damage the machine running the fuzzer (one did: "/" went to mode 000).
_OCI_VICTIM = TMP / "oci-victim"
_OCI_TARGETS = [str(_OCI_VICTIM), "..", "../..", str(_OCI_VICTIM / "passwd"), "a", "a/b", "l", "l/x", "h", "etc",
                "", "x" * 200, str(_OCI_VICTIM / "sub")]


def _oci_victim_state() -> list[tuple[str, int, int, int, int, bytes]]:
    """Mode, owner and times of the victim directory, its file and subdirectory (made on
    first use) and the mode and owner of the fuzzer's scratch root; the file's bytes."""
    if not _OCI_VICTIM.exists():
        (_OCI_VICTIM / "sub").mkdir(parents=True)
        (_OCI_VICTIM / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
        for p in (_OCI_VICTIM, _OCI_VICTIM / "sub", _OCI_VICTIM / "passwd"):
            os.chmod(p, 0o751)
    out = []
    for p in (_OCI_VICTIM, _OCI_VICTIM / "sub", _OCI_VICTIM / "passwd", TMP):
        st = os.lstat(p)
        out.append((str(p), st.st_mode, st.st_uid, st.st_gid, 0 if p == TMP else st.st_mtime_ns,
                    p.read_bytes() if p.name == "passwd" else b""))      # (TMP's entries come and go)
    return out


def _oci_layer(inp: Input) -> bytes:
    """A layer tar whose members the input picks: hostile names, links out of the root, links
    through links, whiteouts, devices, huge or odd numbers and PAX records."""
    import tarfile

    out = io.BytesIO()
    kinds = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
             tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE]
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for _ in range(1 + inp.u8() % 12):
            name = _OCI_NAMES[inp.u8() % len(_OCI_NAMES)]
            ti = tarfile.TarInfo(name)
            ti.type = kinds[inp.u8() % len(kinds)]
            ti.mode = inp.u16() & 0o7777
            ti.uid, ti.gid = inp.u8(), inp.u8()
            ti.mtime = 1_700_000_000
            v = inp.u8()
            if ti.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = _OCI_TARGETS[v % len(_OCI_TARGETS)]
            if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                ti.devmajor, ti.devminor = inp.u8(), inp.u8()
            if v & 0x80:                         # a hostile PAX record
                key = ["mtime", "uid", "gid", "size", "path", "linkpath", "SCHILY.xattr.user.a",
                       "SCHILY.xattr.trusted.x", "SCHILY.xattr.", "SCHILY.xattr.user.\0"][inp.u8() % 10]
                ti.pax_headers = {key: ["-1", "1e400", "99999999999999999999999", "nan", "a\0b", "../../x",
                                        "1.5", "", "/etc/x", "x" * 300][inp.u8() % 10]}
            body = inp.bytes(inp.u8()) if ti.type in (tarfile.REGTYPE, tarfile.CONTTYPE) else b""
            ti.size = len(body)
            try:
                t.addfile(ti, io.BytesIO(body) if body else None)
            except (ValueError, UnicodeError, OverflowError):
                pass                             # (tarfile would not write that one)
    raw = out.getvalue()
    if inp.u8() % 4 == 0:                        # a header number overwritten (octal or base-256)
        at = (inp.u16() % max(1, len(raw) // 512)) * 512
        field = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)][inp.u8() % 7]
        value = b"\x80" + inp.bytes(field[1] - 1).rjust(field[1] - 1, b"\xff")
        block = bytearray(raw[at:at + 512])
        if len(block) == 512:
            block[field[0]:field[0] + field[1]] = value
            block[148:156] = b" " * 8
            block[148:156] = b"%06o\0 " % sum(block)
            raw = raw[:at] + bytes(block) + raw[at + 512:]
    return raw


def _oci_image(inp: Input, mode: int, src: Path) -> Path:
    """An image source the input makes: a layout directory or a docker archive, its JSON documents
    the real ones with fuzzed swaps, its layers `_oci_layer`s (or raw bytes)."""
    import gzip

    from pyvirt.testing import oci

    layers = [_oci_layer(inp) if inp.u8() & 3 else inp.bytes(inp.u16() % 2048) for _ in range(1 + inp.u8() % 3)]
    config = oci.image_config(layers, Cmd=["sh"], User="app")
    v = inp.u8()
    if v & 1:
        key = ["os", "architecture", "rootfs", "config", "Cmd", "User", "Env", "WorkingDir"][(v >> 1) % 8]
        value = [None, 1, "riscv64", [], {}, ["a\0"], "0:0", "\u00b2", [1], {"diff_ids": "x"},
                 {"diff_ids": ["sha256:" + "0" * 64]}, "/", "root:999999999999", "1:2:3", "-1", ["A=1"] * 3][(v >> 4) % 16]
        if key in ("os", "architecture", "rootfs", "config"):
            config[key] = value
        else:
            config["config"][key] = value
    if mode == 2:
        root = src / "layout"
        oci.write_layout(root, config, layers)
        if inp.u8() & 1:                         # a document swapped for a hostile one
            docs = [root / "index.json"] + sorted((root / "blobs" / "sha256").iterdir())
            target = docs[inp.u8() % len(docs)]
            target.unlink()
            pick = inp.u8() % 6
            if pick == 0:
                target.write_bytes(inp.bytes(inp.u8()))
            elif pick == 1:
                target.symlink_to("/etc/passwd")
            elif pick == 2:
                target.mkdir()
            else:
                doc: Any = [{"manifests": [{"digest": "sha256:" + "a" * 64}]}, {"manifests": []},
                            {"manifests": [1, 2]}, {"layers": [], "config": {}}][pick - 3]
                target.write_text(json.dumps(doc))
        return root if inp.u8() & 1 else Path(f"{root}:latest")
    path = src / "image.tar"
    oci.write_docker_archive(path, config, [gzip.compress(x, mtime=0) if inp.u8() & 1 else x for x in layers])
    return path


def _walk_files(top: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(top):
        out.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return out


def fuzz_oci(data: bytes) -> None:
    """Files a user did not make, into a root file system: with a first byte of 0 the input is
    one layer (plain, or gzip/zstd by the harness) applied by `oci/unpack.apply_layers`; 1, a
    layer of hostile members (`_oci_layer`); 2 or 3, an OCI layout or a docker archive
    (`_oci_image`) through `resolve_image`, its layers unpacked and its config made into the
    container's process (`guest.process`, with the tree's /etc/passwd) as `pyvirt run --oci`
    does.  Only a one-line PyvirtError (OciError, ConfigError) may come out, and nothing may
    appear, change or go anywhere under the scratch directory but the root and the blob store."""
    import hashlib

    from pyvirt.errors import PyvirtError
    from pyvirt.oci.guest import RunOptions, process
    from pyvirt.oci.rootfs import _account_file
    from pyvirt.oci.source import resolve_image
    from pyvirt.oci.store import BlobStore
    from pyvirt.oci.unpack import apply_layers

    if not data:
        return
    work = TMP / "oci"
    shutil.rmtree(work, ignore_errors=True)
    src, rootfs, store_dir = work / "src", work / "rootfs", work / "store"
    for d in (src, rootfs, store_dir):
        d.mkdir(parents=True)
    (work / "victim").write_bytes(b"keep")
    victims = _oci_victim_state()
    mode, inp = data[0] % 4, Input(data[1:])
    store = BlobStore(store_dir)
    try:
        if mode < 2:
            how = inp.u8()
            layer = _oci_layer(inp) if mode == 1 else inp.data[inp.pos:]
            if how % 3 == 1:
                import gzip
                layer = gzip.compress(layer, mtime=0)
            elif how % 3 == 2:
                import zstandard
                layer = zstandard.ZstdCompressor(level=1).compress(layer)
            digest = "sha256:" + hashlib.sha256(layer).hexdigest()
            store.put_bytes(digest, layer)
            apply_layers(rootfs, store, [digest], [], limit=64 << 20)
            return
        ref = _oci_image(inp, mode, src)
        before = _walk_files(TMP) - _walk_files(work)
        img = resolve_image(str(ref), store)
        apply_layers(rootfs, store, img.layers, img.diff_ids, limit=64 << 20)
        process(img.config, RunOptions(), _account_file(rootfs, "passwd").decode("utf-8", "replace"),
                _account_file(rootfs, "group").decode("utf-8", "replace"))
        if _walk_files(TMP) - _walk_files(work) != before:
            raise AssertionError("a file appeared or went outside the image's directory")
    except PyvirtError as e:
        if "\n" in str(e):
            raise AssertionError(f"a multi-line error: {e!r}") from None
    finally:
        outside = _walk_files(work) - _walk_files(rootfs) - _walk_files(store_dir) - _walk_files(src) \
            - {str(rootfs), str(store_dir), str(src), str(work / "victim")}
        if outside or (work / "victim").read_bytes() != b"keep":
            raise AssertionError(f"written outside the root: {sorted(outside)[:3]}")
        changed = [a[0] for a, b in zip(victims, _oci_victim_state()) if a != b]
        if changed:
            raise AssertionError(f"metadata or data changed outside the root: {changed}")
        shutil.rmtree(work, ignore_errors=True)


def _oci_seeds() -> Iterator[bytes]:
    from pyvirt.testing import oci

    yield b"\0\0" + oci.layer([("etc", "dir"), ("etc/passwd", "file", b"app:x:1000:1000::/home:/bin/sh\n"),
                               ("bin", "dir"), ("bin/sh", "file", b"#!", 0o755), ("l", "symlink", "bin/sh"),
                               ("h", "hardlink", "bin/sh"), ("a/.wh..wh..opq", "whiteout")])
    yield bytes([1, 1, 4, 0, 0, 0o644 & 255, 1, 0, 0, 0, 4]) + b"root" + bytes([5, 2, 0, 0, 0, 0, 4, 6, 0, 0, 0])
    yield bytes([2, 1, 0]) + bytes([1, 2, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0]) + bytes([0, 0, 1])
    yield bytes([3, 1, 1]) + bytes([1, 2, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0]) + bytes([0, 1, 0])


# -- the daemon <-> runner control protocol ----------------------------------------------------
def fuzz_control(data: bytes) -> None:
    """Bytes from a control client, in the chunks the input says, through the runner's
    line framing and request handler (with a stand-in VM)."""
    import socket

    from pyvirt.host.control import ControlServer
    from pyvirt.host.runner import Runner

    class Vm:
        paused = False

        def pause(self) -> None:
            self.paused = True

        def resume(self) -> None:
            self.paused = False

        def request_quit(self) -> None:
            pass

        def request_snapshot(self, directory: str, **kw: Any) -> None:
            if not isinstance(directory, str):
                raise AssertionError("snapshot dir not a string")

        class stats:
            instructions = 0
            resets = 0

    class FakeRunner:
        vm = Vm()
        last_snapshot = None
        paths = type("P", (), {"dir": TMP})()
        console = type("C", (), {"client": None})()
        reason = ""

        def send_agent(self, line: str) -> None:
            if "\n" in line:
                raise AssertionError(f"a newline reaches the guest agent: {line!r}")

        def agent_open(self) -> bool:
            return False

        status = Runner.status
        snapshot = Runner.snapshot
        handle = Runner.handle

    runner = FakeRunner()
    server = ControlServer.__new__(ControlServer)
    server.handler = runner.handle
    a, b = socket.socketpair()
    b.setblocking(False)
    server.clients = {b.fileno(): (b, bytearray())}
    try:
        inp = Input(data)
        while inp.more() and b.fileno() in server.clients:
            chunk = inp.bytes(1 + inp.u8() * 4)
            a.sendall(chunk)
            server._read(b.fileno())
            a.setblocking(False)
            try:
                while a.recv(1 << 16):
                    pass
            except BlockingIOError:
                pass
            a.setblocking(True)
            for _, buf in server.clients.values():
                if len(buf) > 2 * (64 << 10):
                    raise AssertionError(f"a client's buffer grew to {len(buf)} bytes")
    finally:
        a.close()
        b.close()


def _control_seeds() -> Iterator[bytes]:
    for line in (b'{"op": "status"}\n', b'{"op": "mac", "iface": "eth0", "address": "52:54:00:00:00:01"}\n',
                 b'{"op": "snapshot", "dir": "/tmp/x", "then": "quit"}\n', b'{"op": "hostname", "name": "a"}\n'):
        yield bytes([len(line) // 4]) + line


# -- the guest agent's answers ------------------------------------------------------------------
_AGENT_TYPES = "VMDZX12xTE?\0"


def _agent_stream(inp: Input) -> bytes:
    """What a hostile agent sends on one connection: a greeting (right, or not), then frames
    of types the host knows (and others), honest or lying lengths, payloads from the input."""
    from pyvirt.host.agent import FRAME, PROTOCOL

    out = bytearray()
    if inp.u8() % 8:
        out += FRAME.pack(len(PROTOCOL), ord("V")) + PROTOCOL.encode()
    for _ in range(inp.u8() % 10):
        typ = _AGENT_TYPES[inp.u8() % len(_AGENT_TYPES)]
        how = inp.u8()
        if typ == "M" and how & 1:
            body = struct.pack("<III", inp.u32(), inp.u16() if how & 2 else inp.u32(), inp.u8() if how & 4 else 0)
        elif typ == "x" and how & 1:
            body = struct.pack("<IB", inp.u8() if how & 2 else inp.u32(), inp.u8())
        elif typ == "D" and how & 1:
            body = bytes([inp.u8()]) * (inp.u16() % 70000)
        elif typ == "T" and how & 1:                 # port words: long, non-ASCII digits
            body = b"9" * (inp.u16() % 6000) + " \u00b2 22 ".encode() + inp.bytes(inp.u8() % 16)
        else:
            body = inp.bytes(inp.u8())
        n = len(body) if how & 0x80 == 0 else inp.u32()
        out += FRAME.pack(n, ord(typ)) + body
    return bytes(out)


def fuzz_agent(data: bytes) -> None:
    """A hostile guest agent answering the host's requests (host/agent.py's `Agent`): the
    greeting, `pyvirt cp` from the guest into a named file or directory (`read_file`: the
    file's mode, size and data), exec output and exit status (`run`), listening ports, small
    requests, a copy to the guest.  Each request's connection carries a stream from
    `_agent_stream`.  Only a one-line AgentError may come out; a copy may write only its
    destination (no other file appears, changes or goes; no temporary file stays; no set-id
    bit); a copy that failed leaves the destination as it was."""
    import socket

    import pyvirt.host.agent as agent_mod
    from pyvirt.host.agent import Agent, AgentError

    inp = Input(data)
    work = TMP / "agent"
    shutil.rmtree(work, ignore_errors=True)
    (work / "dest").mkdir(parents=True)
    (work / "victim").write_bytes(b"keep")
    (work / "dest" / "old").write_bytes(b"old")
    (work / "src").write_bytes(b"host file\n" * 10)
    (work / "dest" / "sub").mkdir()
    pairs: list[Any] = []

    def connect_guest(path: Any, port: int, timeout: float = 5.0) -> tuple[Any, int]:
        a, b = socket.socketpair()
        pairs.extend((a, b))
        stream = _agent_stream(inp)
        b.setblocking(False)
        try:
            while stream:
                stream = stream[b.send(stream):]
        except BlockingIOError:
            pass
        b.shutdown(socket.SHUT_WR)
        return a, 1 << 30

    saved = agent_mod.connect_guest
    agent_mod.connect_guest = connect_guest
    agent = Agent(work / "vsock")
    try:
        for _ in range(1 + inp.u8() % 3):
            op = inp.u8() % 7
            target: Path | None = None
            try:
                if op == 0:
                    guest = ["/etc/hostname", "a/b", "/", "..", "../../x", "/x/.", "sub", "old"][inp.u8() % 8]
                    dest = [work / "dest", work / "dest" / "new", work / "dest" / "old", work / "dest" / "sub",
                            work / "dest" / "nodir" / "x"][inp.u8() % 5]
                    from pyvirt.host.agent import local_target
                    try:
                        target = local_target(guest, dest)
                    except AgentError:
                        target = None
                    before = target.read_bytes() if target is not None and target.is_file() else None
                    try:
                        agent.read_file(guest, dest)
                    except AgentError:
                        if target is not None and (target.read_bytes() if target.is_file() else None) != before:
                            raise AssertionError(f"a failed copy changed {target}") from None
                        raise
                    if target is not None and target.stat().st_mode & 0o7000:
                        raise AssertionError(f"{target} has set-id bits")
                elif op == 1:
                    agent.run(["sh", "-c", "true"], input=b"in" if inp.u8() & 1 else None)
                elif op == 2:
                    agent.listening_ports()
                elif op == 3:
                    agent.set_clock(1e9)
                elif op == 4:
                    agent.wait(0)
                elif op == 5:
                    agent.write_file(work / "src", "/tmp/x")
                else:
                    agent.set_hostname("vm")
            except AgentError as e:
                if "\n" in str(e):
                    raise AssertionError(f"a multi-line error: {e!r}") from None
    finally:
        agent_mod.connect_guest = saved
        for s in pairs:
            s.close()
        extra = sorted(str(p.relative_to(work)) for p in work.rglob("*")
                       if p.name not in ("victim", "src", "dest", "old", "sub", "new", "hostname", "x", "b")
                       or not p.is_relative_to(work / "dest") and p.name not in ("victim", "src", "dest"))
        if extra or (work / "victim").read_bytes() != b"keep":
            raise AssertionError(f"written outside the destination: {extra[:3]}")
        shutil.rmtree(work, ignore_errors=True)


def _agent_seeds() -> Iterator[bytes]:
    # cp /etc/hostname -> dest/: M (mode 0644, 6 bytes), D "hello\n", Z
    meta = bytes([1, 3]) + struct.pack("<IH", 0o104755, 6)
    yield bytes([0, 0, 0, 0]) + bytes([1, 3]) + meta + bytes([2, 0, 6]) + b"hello\n" + bytes([3, 0, 0])
    yield bytes([1, 0, 0, 1]) + bytes([1, 3]) + meta + bytes([2, 0, 9]) + b"too long\n" + bytes([3, 0, 0]) \
        + bytes([0, 0, 2]) + bytes([1, 3]) + meta + bytes([2, 0, 6]) + b"hello\n" + bytes([3, 0, 0])
    # run: stdout "hi", exit 0
    yield bytes([0, 1, 0, 1, 3, 5, 0, 2]) + b"hi" + bytes([7, 1, 0, 0])
    yield bytes([1, 2, 1, 2, 8, 0, 5]) + b"22 80"
    yield bytes([0, 5, 1, 1, 3, 0, 0])


# -- vhost-user: what a hostile back end answers ---------------------------------------------------
_VHOST_REQS = [1, 2, 3, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 99]    # (vhost_user.py's request numbers)


def fuzz_vhost_user(data: bytes) -> None:
    """A hostile vhost-user back end (virtiofsd's place): the front end (backends/vhost_user.py)
    runs a whole session -- handshake, features, the memory table, a ring started and stopped --
    against replies the input spells: right or wrong request numbers, flags and sizes, payloads,
    descriptors attached (which the front end must close), the connection cut anywhere.  Only a
    one-line VhostUserError may come out, and no descriptor may stay open."""
    import socket

    from pyvirt.backends import vhost_user as vu

    inp = Input(data)
    fds_before = _fds()
    a, b = socket.socketpair()
    mine: list[int] = []
    try:
        reqs = _VHOST_REQS
        b.setblocking(False)
        for _ in range(inp.u8() % 24):           # the back end's replies, queued up front
            how = inp.u8()
            req = reqs[inp.u8() % len(reqs)]
            flags = vu.VERSION | vu.FLAG_REPLY if how & 1 else inp.u32()
            body = struct.pack("<Q", inp.int(8)) if how & 2 else inp.bytes(inp.u8() % 24)
            size = len(body) if how & 4 else inp.u32()
            msg = struct.pack("<III", req, flags, size) + body
            anc = []
            if how & 0x30:
                extra = [os.eventfd(0) for _ in range((how >> 4) & 3)]
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(extra)}i", *extra))]
                mine += extra
            try:
                b.sendmsg([msg], anc)
            except BlockingIOError:
                break
            for fd in mine:
                os.close(fd)
            mine.clear()
        if inp.u8() & 1:
            b.shutdown(socket.SHUT_WR)
        front = vu.VhostUserFrontEnd(a, "fuzz", timeout=0.05)
        mem = os.memfd_create("fuzz-ram")
        ev = [os.eventfd(0) for _ in range(3)]
        mine += [mem, *ev]
        os.ftruncate(mem, 1 << 16)
        try:
            features = front.handshake()
            front.set_features(features & 0xFFFF_FFFF)
            front.set_mem_table([vu.Region(0x8000_0000, 1 << 16, mem)])
            front.start_ring(0, 16, 0x8000_0000, 0x8000_1000, 0x8000_2000, *ev)
            front.stop_ring(0)
            front.peer_gone()
        except vu.VhostUserError as e:
            if "\n" in str(e) or not front.broken:
                raise AssertionError(f"a multi-line error, or the front end not marked broken: {e!r}") from None
            try:
                front.call(vu.SET_OWNER)
                raise AssertionError("a broken front end sent another request")
            except vu.VhostUserError:
                pass
    finally:
        for fd in mine:
            os.close(fd)
        a.close()
        b.close()
    if _fds() != fds_before:
        raise AssertionError(f"descriptors open before {fds_before}, after {_fds()}")


def _vhost_user_seeds() -> Iterator[bytes]:
    from pyvirt.backends import vhost_user as vu

    # a back end with protocol features and REPLY_ACK: owner ack, features, protocol features,
    # then an ack for every request after, GET_VRING_BASE answering (0, 5)
    def reply(req: int, value: int, fds: int = 0) -> bytes:
        return bytes([1 | 2 | 4 | fds << 4, _VHOST_REQS.index(req)]) + struct.pack("<Q", value)

    acks = [reply(r, 0) for r in (vu.SET_PROTOCOL_FEATURES, vu.SET_FEATURES, vu.SET_MEM_TABLE, vu.SET_VRING_NUM,
                                  vu.SET_VRING_BASE, vu.SET_VRING_ADDR, vu.SET_VRING_CALL, vu.SET_VRING_ERR,
                                  vu.SET_VRING_KICK, vu.SET_VRING_ENABLE, vu.SET_VRING_ENABLE)]
    seq = [reply(vu.GET_FEATURES, vu.F_PROTOCOL_FEATURES | 1),
           reply(vu.GET_PROTOCOL_FEATURES, vu.PROTOCOL_F_REPLY_ACK)] + acks + [reply(vu.GET_VRING_BASE, 5 << 32)]
    yield bytes([len(seq)]) + b"".join(seq) + bytes([0])
    yield bytes([2]) + reply(vu.GET_FEATURES, 1, fds=2) + reply(vu.SET_FEATURES, 0) + bytes([1])


# -- the REST API's request models --------------------------------------------------------------
def fuzz_request(data: bytes) -> None:
    """A request body for VM create, export or import, validated by the REST API's models and
    (create) resolved to a spec and host limits as pyvirtd does.  The body is built from the
    input field by field (names the models know, values of every JSON type), so that most
    inputs get past JSON and reach pyvirt's own checks.  Only a pydantic ValidationError or a
    one-line PyvirtError may come out."""
    from pydantic import ValidationError

    from pyvirt.errors import PyvirtError
    from pyvirt.host.models import ExportRequest, ImportRequest, VmCreate, to_spec

    inp = Input(data)
    model = (VmCreate, ExportRequest, ImportRequest)[inp.u8() % 3]
    names = sorted(model.model_fields) + ["bogus"]
    strings = ["", "64M", "1G", "0", "-1", "9" * 30, "1.5G", "user", "user,host-loopback=on", "network=n",
               "/dev/null", "/dev/null,ro", "/nonexistent", "x:y", "8080:80", "a=/tmp/s", "default", "debian",
               "sv48", "interp", "../x", "a\nb", "\0", "hvc0=/tmp/x.sock", "1T", "64G"]

    def value() -> Any:
        kind = inp.u8() % 8
        if kind == 0:
            return strings[inp.u8() % len(strings)]
        if kind == 1:
            return inp.bytes(inp.u8() % 24).decode("utf-8", "replace")
        if kind == 2:
            return inp.int(8) - (1 << 63)
        if kind == 3:
            return [value() for _ in range(inp.u8() % 4)]
        if kind == 4:
            return bool(inp.u8() & 1)
        if kind == 5:
            return None
        if kind == 6:
            return inp.u16() / 7
        return {"k": strings[inp.u8() % len(strings)]}

    body: dict[str, Any] = {"name": "fuzz"} if model is VmCreate else {"path": "/tmp/x.tar.zst"}
    for _ in range(inp.u8() % 8):
        body[names[inp.u8() % len(names)]] = value()
    try:
        req = model.model_validate(body)
    except ValidationError:
        return
    if isinstance(req, VmCreate):
        if req.image not in (None, "default") or req.root_disk:
            return                           # would build or copy an image: out of scope here
        try:
            to_spec(req)
        except PyvirtError as e:
            if "\n" in str(e):
                raise AssertionError(f"a multi-line error: {e!r}") from None


def _request_seeds() -> Iterator[bytes]:
    yield bytes([0, 3, 5, 0, 2, 9, 0, 7])
    yield bytes([0, 2, 6, 3, 2, 0, 9, 0, 10])
    yield bytes([1, 1, 0, 0, 4])
    yield bytes([2, 2, 1, 0, 7, 3, 0, 2])


TARGETS: dict[str, Callable[[bytes], None]] = {
    "virtio_blk": fuzz_virtio_blk,
    "virtio_net": fuzz_virtio_net,
    "virtio_console": fuzz_virtio_console,
    "virtio_rng": fuzz_virtio_rng,
    "virtio_mmio": fuzz_virtio_mmio,
    "virtio_vsock": fuzz_virtio_vsock,
    "qcow2": fuzz_qcow2,
    "snapshot_state": fuzz_snapshot_state,
    "archive": fuzz_archive,
    "migration": fuzz_migration,
    "oci": fuzz_oci,
    "control": fuzz_control,
    "agent": fuzz_agent,
    "vhost_user": fuzz_vhost_user,
    "request": fuzz_request,
}


def _device_seeds() -> Iterator[bytes]:
    # a chain of a readable header and a writable buffer, kicked, polled; then raw ring writes
    yield bytes([0, 0, 1, 16, 0, 0]) + bytes(16) + bytes([4, 0, 0, 5, 0])
    yield bytes([0, 0, 2, 16, 0, 0]) + struct.pack("<IIQ", 0, 0, 0) + bytes([0, 0, 2, 1]) + bytes([4, 0, 0])
    yield bytes([1, 0, 1, 0, 0, 0, 0, 0, 16, 0, 0, 1, 0, 2, 0]) + bytes([2, 0, 0, 0, 4, 0, 0])
    yield bytes([11, 0, 64, 0]) + bytes(64) + bytes([0, 0, 1, 0, 8, 1, 4, 0, 0, 5, 0])


SEEDS: dict[str, Callable[[], Iterator[bytes]]] = {
    "virtio_blk": _device_seeds,
    "virtio_net": _device_seeds,
    "virtio_console": _device_seeds,
    "virtio_rng": _device_seeds,
    "virtio_vsock": _vsock_seeds,
    "virtio_mmio": lambda: iter([bytes(range(64)), bytes([2, 0x70, 0, 1, 0, 0, 0, 1])]),
    "qcow2": _qcow2_seeds,
    "snapshot_state": _snapshot_seeds,
    "archive": _archive_seeds,
    "migration": _migration_seeds,
    "oci": _oci_seeds,
    "control": _control_seeds,
    "agent": _agent_seeds,
    "vhost_user": _vhost_user_seeds,
    "request": _request_seeds,
}
