"""A vhost-user front end: pyvirt's side of the vhost-user protocol over a Unix socket.

A vhost-user back end (virtiofsd) serves a virtio device's queues in its own process: the
front end shares guest RAM with it (a memfd, SET_MEM_TABLE), tells it where each ring is
(SET_VRING_NUM/ADDR/BASE) and hands it three eventfds per ring: *kick* (the front end
writes it when the driver notifies the queue), *call* (the back end writes it when it wants
the driver interrupted) and *err*.  Every message is a 12-byte header (request, flags,
payload size; little-endian u32s) and a payload; descriptors travel as SCM_RIGHTS.

    GET_FEATURES / SET_FEATURES                  virtio feature bits (+ bit 30: protocol features)
    GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES   REPLY_ACK: the back end acks what it was told
    SET_OWNER                                    this socket is the session's owner
    SET_MEM_TABLE                                guest RAM regions, each with its descriptor
    SET_VRING_NUM / ADDR / BASE                  ring size, ring areas, next available index
    SET_VRING_KICK / CALL / ERR                  the ring's eventfds
    SET_VRING_ENABLE                             rings start disabled when bit 30 is negotiated
    GET_VRING_BASE                               stops the ring; its next available index

The back end is a peer on a socket, so nothing it sends is trusted: each reply must carry
the request's number, version 1 and the reply flag, and exactly the payload size that
request has; descriptors sent back are closed; a silent back end times out.  Any breach is
one `VhostUserError` and the front end is unusable from then on (the device reports it
to the driver as DEVICE_NEEDS_RESET).

Ring addresses are given in the front end's own address space as the spec asks; here that
space is guest-physical (each region's `userspace_addr` is its guest address), so a ring's
address needs no translation.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyvirt.errors import PyvirtError

GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18

VERSION = 1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
F_PROTOCOL_FEATURES = 1 << 30                 # a virtio feature bit the back end offers
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
WANTED_PROTOCOL = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK
MAX_REGIONS = 8
VRING_NOFD = 1 << 8                           # SET_VRING_*: no descriptor (polling)
TIMEOUT = 10.0                                # seconds a back end has to answer

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")                 # vring state: index, num
_ADDR = struct.Struct("<IIQQQQ")              # index, flags, desc, used, avail, log
_REGION = struct.Struct("<QQQQ")              # guest address, size, user address, mmap offset
_REPLY_SIZE = {GET_FEATURES: 8, GET_PROTOCOL_FEATURES: 8, GET_QUEUE_NUM: 8, GET_VRING_BASE: 8}


class VhostUserError(PyvirtError):
    """The back end broke the protocol, went away or did not answer in time."""


@dataclass(frozen=True)
class Region:
    """One guest RAM region shared with the back end: `fd` maps it from `offset`."""

    guest_addr: int
    size: int
    fd: int
    offset: int = 0


class VhostUserFrontEnd:
    """One connection to a vhost-user back end.  Not thread-safe; blocking, with a timeout."""

    def __init__(self, sock: socket.socket, name: str = "vhost-user", timeout: float = TIMEOUT) -> None:
        self.sock = sock
        self.name = name
        sock.settimeout(timeout)
        self.broken = ""
        self.protocol_features = 0
        self.features = 0                     # what the back end offers (GET_FEATURES)

    @classmethod
    def connect(cls, path: str, name: str = "vhost-user", timeout: float = TIMEOUT) -> VhostUserFrontEnd:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(timeout)
            s.connect(path)
        except OSError as e:
            s.close()
            raise VhostUserError(f"{name}: cannot connect to {path}: {e.strerror or e}") from None
        return cls(s, name, timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # -- the session (what the device does when the driver goes live) ------------------------
    def handshake(self) -> int:
        """SET_OWNER, the back end's features (returned) and, if offered, protocol features."""
        self.call(SET_OWNER)
        self.features = self.get_u64(GET_FEATURES)
        if self.features & F_PROTOCOL_FEATURES:
            offered = self.get_u64(GET_PROTOCOL_FEATURES)
            self.protocol_features = offered & WANTED_PROTOCOL
            self.call(SET_PROTOCOL_FEATURES, _U64.pack(self.protocol_features))
        return self.features

    def set_features(self, features: int) -> None:
        """The driver's features, plus protocol features when the back end offered them."""
        self.call(SET_FEATURES, _U64.pack(features | (self.features & F_PROTOCOL_FEATURES)))

    def set_mem_table(self, regions: Sequence[Region]) -> None:
        if not 1 <= len(regions) <= MAX_REGIONS:
            raise ValueError(f"1..{MAX_REGIONS} memory regions, not {len(regions)}")
        payload = struct.pack("<II", len(regions), 0) + b"".join(
            _REGION.pack(r.guest_addr, r.size, r.guest_addr, r.offset) for r in regions)
        self.call(SET_MEM_TABLE, payload, [r.fd for r in regions])

    def start_ring(self, index: int, size: int, desc: int, avail: int, used: int,
                   kick: int, call: int, err: int, base: int = 0) -> None:
        """Everything a ring needs to run, then enabled (descriptors: eventfds).  `base`:
        the next available index the back end takes (0 for a ring the driver just set up;
        a restored ring's index, its requests all answered)."""
        self.call(SET_VRING_NUM, _STATE.pack(index, size))
        self.call(SET_VRING_BASE, _STATE.pack(index, base & 0xFFFF))
        self.call(SET_VRING_ADDR, _ADDR.pack(index, 0, desc, used, avail, 0))
        self.call(SET_VRING_CALL, _U64.pack(index), [call])
        self.call(SET_VRING_ERR, _U64.pack(index), [err])
        self.call(SET_VRING_KICK, _U64.pack(index), [kick])
        if self.features & F_PROTOCOL_FEATURES:
            self.call(SET_VRING_ENABLE, _STATE.pack(index, 1))

    def stop_ring(self, index: int) -> int:
        """GET_VRING_BASE: the back end stops the ring; returns its next available index."""
        if self.features & F_PROTOCOL_FEATURES:
            self.call(SET_VRING_ENABLE, _STATE.pack(index, 0))
        index_back, base = _STATE.unpack(self.request(GET_VRING_BASE, _STATE.pack(index, 0)))
        if index_back != index:
            raise self._fail(f"GET_VRING_BASE answered for ring {index_back}, not {index}")
        return base

    # -- messages ------------------------------------------------------------------------
    def get_u64(self, req: int) -> int:
        value: int = _U64.unpack(self.request(req))[0]
        return value

    def call(self, req: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A message without a reply of its own; with REPLY_ACK, wait for the back end's ack."""
        ack = bool(self.protocol_features & PROTOCOL_F_REPLY_ACK)
        self._send(req, payload, fds, FLAG_NEED_REPLY if ack else 0)
        if ack:
            status = _U64.unpack(self._receive(req, 8))[0]
            if status != 0:
                raise self._fail(f"the back end refused request {req} (status {status})")

    def request(self, req: int, payload: bytes = b"") -> bytes:
        """A message with a reply of a known size (`_REPLY_SIZE`)."""
        self._send(req, payload, (), 0)
        return self._receive(req, _REPLY_SIZE[req])

    def _fail(self, why: str) -> VhostUserError:
        self.broken = why
        return VhostUserError(f"{self.name}: {why}")

    def _send(self, req: int, payload: bytes, fds: Sequence[int], flags: int) -> None:
        if self.broken:
            raise VhostUserError(f"{self.name}: {self.broken}")
        msg = _HEADER.pack(req, VERSION | flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            sent = self.sock.sendmsg([msg], anc)
            if sent < len(msg):
                self.sock.sendall(msg[sent:])
        except OSError as e:
            raise self._fail(f"cannot send request {req}: {e.strerror or e}") from None

    def _receive(self, req: int, size: int) -> bytes:
        header = self._read_exact(_HEADER.size, req)
        got_req, flags, length = _HEADER.unpack(header)
        if got_req != req:
            raise self._fail(f"reply to request {got_req}, expected {req}")
        if flags & 0x3 != VERSION or not flags & FLAG_REPLY:
            raise self._fail(f"reply to request {req} with flags {flags:#x} (not version 1, reply)")
        if length != size:
            raise self._fail(f"reply to request {req} of {length} bytes, expected {size}")
        return self._read_exact(size, req)

    def _read_exact(self, n: int, req: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * 8))
            except socket.timeout:
                raise self._fail(f"no reply to request {req} within {self.sock.gettimeout()} s") from None
            except OSError as e:
                raise self._fail(f"cannot read the reply to request {req}: {e.strerror or e}") from None
            for level, kind, fdata in anc:        # a reply carries no descriptor: drop any
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(fdata[:len(fdata) - len(fdata) % fds.itemsize])
                    for fd in fds:
                        os.close(fd)
            if not data:
                raise self._fail(f"the back end closed the connection (request {req})")
            buf += data
        return bytes(buf)

    def peer_gone(self) -> bool:
        """Between requests the back end sends nothing: a readable socket means it closed
        (or is talking out of turn, which is as bad)."""
        import select
        try:
            r, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(r)
