"""Pre-copy live migration of one running VM over a connected stream socket (docs/migration.md).

The stream is a sequence of frames, each `type (1 byte) | length (4 bytes, big-endian) |
payload`, in this order from the source::

    HELLO     JSON {"protocol": "pyvirt-migration", "version": 1, "token": ...}   -> OK / ERROR
    SPEC      JSON: the VmSpec                                                     -> OK / ERROR
    PAGES*    zstd: u32 count, count u32 page indexes, count pages of 4 KiB  (any number, no reply)
    STATE     zstd: the machine's state (board.save_state, JSON)
    COMPLETE  (empty)                                            -> READY (board built) / ERROR
    GO        (empty): the destination runs the VM; the source has ended it
    ABANDON   (empty, at any point): the destination drops everything it received

The destination answers with OK, READY or ERROR (a one-line reason, UTF-8).  Every frame a
peer sends is checked (type expected now, length bounded, page indexes inside RAM,
decompressed sizes bounded, the state checked against the machine's schema as a snapshot's
is); a bad one ends the migration with one line, the source VM running on unchanged.

The source side (`Migration`) runs between the VM's slices (a `Watch`'s tick): the first
round sends every non-zero page while the guest runs, each later round what the dirty-page
log (memory.py) says was written since; when what is left would go in less than the downtime
target at the measured bandwidth, the last pages, the state and COMPLETE go in one tick --
the guest does not run meanwhile -- and on READY the source sends GO and ends its run.
A guest that writes faster than the link gets fewer instructions per second in steps
(auto-converge: each tick then also spends a share of time sending, or waiting).
"""

from __future__ import annotations

import hmac
import json
import mmap
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zstandard

from pyvirt.backends.char import CharBackend
from pyvirt.errors import PyvirtError
from pyvirt.memory import PAGE_SIZE, RAM_TAIL
from pyvirt.spec import VmSpec
from pyvirt.state import encode_bytes

PROTOCOL = "pyvirt-migration"
VERSION = 1
(HELLO, SPEC, PAGES, STATE, COMPLETE, GO, ABANDON, OK, READY, ERROR) = range(1, 11)
NAMES = {HELLO: "HELLO", SPEC: "SPEC", PAGES: "PAGES", STATE: "STATE", COMPLETE: "COMPLETE", GO: "GO",
         ABANDON: "ABANDON", OK: "OK", READY: "READY", ERROR: "ERROR"}
HEADER = struct.Struct(">BI")
PAGES_PER_FRAME = 64
MAX_FRAME = 4 << 20             # a compressed frame; more is a bad stream
MAX_PAGES_RAW = 4 + PAGES_PER_FRAME * (4 + PAGE_SIZE)
MAX_STATE = 64 << 20            # as a snapshot's state.json
MAX_HELLO = 64 << 10
DEFAULT_DOWNTIME = 0.3
DEFAULT_TIMEOUT = 600.0
SENDER_SHARE = 0.5             # of the run loop's time, the sender's (one thread for guest and sender)
MAX_TICK = 0.05                # the longest a throttled tick waits
THROTTLE_STEPS = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95)   # auto-converge: the cut of the guest's share, step by step
_CHUNK = 2 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)


class MigrationError(PyvirtError):
    """A migration failed (one line); the source VM runs on."""


# -- frames ----------------------------------------------------------------------------------------
def send_frame(sock: socket.socket, kind: int, payload: bytes = b"") -> int:
    sock.sendall(HEADER.pack(kind, len(payload)) + payload)
    return HEADER.size + len(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            got = sock.recv(min(n - len(buf), 1 << 20))
        except TimeoutError:
            raise MigrationError("migration peer stopped answering") from None
        except OSError as e:
            raise MigrationError(f"migration connection failed: {e.strerror or e}") from None
        if not got:
            raise MigrationError("migration connection closed by the peer" if not buf
                                 else "migration stream truncated")
        buf += got
    return bytes(buf)


def recv_frame(sock: socket.socket, expect: tuple[int, ...], limit: int = MAX_FRAME) -> tuple[int, bytes]:
    kind, length = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if kind == ERROR and ERROR not in expect:
        reason = _recv_exact(sock, min(length, 1024)).decode("utf-8", "replace").splitlines()
        raise MigrationError(f"the destination refused: {reason[0] if reason else 'no reason given'}")
    if kind not in expect:
        raise MigrationError(f"bad migration stream: frame type {kind} where "
                             f"{'/'.join(NAMES[k] for k in expect)} was expected")
    if length > limit:
        raise MigrationError(f"bad migration stream: a {NAMES[kind]} frame of {length} bytes")
    return kind, _recv_exact(sock, length)


def _decompress(data: bytes, limit: int, what: str) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise MigrationError(f"bad migration stream: {what}: {e}") from None
    if len(out) > limit:
        raise MigrationError(f"bad migration stream: {what} too large")
    return out


def encode_pages(ram: mmap.mmap, pages: list[int], cctx: zstandard.ZstdCompressor) -> bytes:
    body = bytearray(struct.pack(f"<I{len(pages)}I", len(pages), *pages))
    for p in pages:
        body += ram[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
    return cctx.compress(bytes(body))


def apply_pages(ram: mmap.mmap, npages: int, payload: bytes) -> int:
    """Write a PAGES frame's pages into `ram`; returns how many."""
    raw = _decompress(payload, MAX_PAGES_RAW, "pages")
    if len(raw) < 4:
        raise MigrationError("bad migration stream: short pages frame")
    (count,) = struct.unpack_from("<I", raw)
    if count > PAGES_PER_FRAME or len(raw) != 4 + count * (4 + PAGE_SIZE):
        raise MigrationError("bad migration stream: pages frame length does not match its count")
    index = struct.unpack_from(f"<{count}I", raw, 4)
    at = 4 + 4 * count
    for i, p in enumerate(index):
        if p >= npages:
            raise MigrationError(f"bad migration stream: page {p} is outside the guest's {npages} pages")
        ram[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = raw[at + i * PAGE_SIZE:at + (i + 1) * PAGE_SIZE]
    return count


def nonzero_pages(ram: mmap.mmap, size: int) -> list[int]:
    out = []
    for base in range(0, size, _CHUNK):
        end = min(base + _CHUNK, size)
        chunk = ram[base:end]
        if chunk == _ZERO_CHUNK[:end - base]:
            continue
        out += [(base + off) >> 12 for off in range(0, end - base, PAGE_SIZE)
                if chunk[off:off + PAGE_SIZE] != _ZERO_PAGE]
    return out


def rarp_announce(mac: bytes) -> bytes:
    """A RARP request for `mac` from `mac` (what QEMU sends after a migration): switches
    learn where the guest's MAC now is."""
    return (b"\xff" * 6 + mac + b"\x80\x35" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3)
            + mac + bytes(4) + mac + bytes(4) + bytes(18))


# -- the source --------------------------------------------------------------------------------------
@dataclass
class MigrationStats:
    rounds: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    total_seconds: float = 0.0
    downtime_seconds: float = 0.0
    throttle: float = 0.0
    bandwidth: float = 0.0        # raw page bytes per second, as measured
    guest_instructions: int = 0   # what the guest ran at the source while it was being migrated
    outcome: str = "running"      # running, completed, cancelled, failed
    error: str | None = None
    history: list[int] = field(default_factory=list)   # pages left at each round's start

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


class Migration:
    """Migrate `vm` to the destination at the other end of `sock` (connected); drive it by
    calling `tick()` between slices (`Vm.start_migration` adds the watch) until `done`."""

    def __init__(self, vm: Any, sock: socket.socket, token: str = "", *, downtime: float = DEFAULT_DOWNTIME,
                 timeout: float = DEFAULT_TIMEOUT, on_timeout: str = "cancel", auto_converge: bool = True,
                 max_bandwidth: float | None = None, spec_json: dict[str, Any] | None = None,
                 finished: Callable[[MigrationStats], None] | None = None) -> None:
        if on_timeout not in ("cancel", "force"):
            raise MigrationError(f"on timeout: cancel or force, not {on_timeout!r}")
        if not 0 < downtime <= 60:
            raise MigrationError("the downtime target must be between 0 and 60 seconds")
        self.vm, self.sock, self.token = vm, sock, token
        self.downtime, self.timeout, self.on_timeout = downtime, timeout, on_timeout
        self.auto_converge = auto_converge
        self.max_bandwidth = max_bandwidth           # bytes of pages a second (QEMU's max-bandwidth)
        self.spec_json = spec_json if spec_json is not None else json.loads(vm.spec.model_dump_json())
        self.finished = finished
        self.stats = MigrationStats()
        self.done = False
        self._cctx = zstandard.ZstdCompressor(level=1)
        self._pending: list[int] = []
        self._started = 0.0
        self._last_tick = 0.0
        self._send_time = 0.0
        self._send_bytes = 0
        self._stuck = 0
        self._instructions = 0
        self._guest_time = 0.0
        self._spent = 0.0

    # The handshake runs before the first page: a refused spec costs nothing.
    def start(self) -> None:
        self._started = time.monotonic()
        self._instructions = self.vm.stats.instructions
        try:
            self.sock.settimeout(30)
            hello = {"protocol": PROTOCOL, "version": VERSION, "token": self.token}
            send_frame(self.sock, HELLO, json.dumps(hello).encode())
            recv_frame(self.sock, (OK,))
            send_frame(self.sock, SPEC, json.dumps(self.spec_json).encode())
            recv_frame(self.sock, (OK,))
        except (MigrationError, OSError) as e:
            self._fail(e)
            return
        bus = self.vm.board.bus
        bus.start_dirty_log()
        self._pending = nonzero_pages(bus.ram, bus.ram_size)
        self.stats.rounds = 1
        self.stats.history.append(len(self._pending))
        self._last_tick = time.monotonic()

    def _send_pages(self, pages: list[int]) -> None:
        ram = self.vm.board.bus.ram
        t0 = time.monotonic()
        for i in range(0, len(pages), PAGES_PER_FRAME):
            part = pages[i:i + PAGES_PER_FRAME]
            self.stats.bytes_sent += send_frame(self.sock, PAGES, encode_pages(ram, part, self._cctx))
            self.stats.pages_sent += len(part)
        self._send_time += time.monotonic() - t0
        self._send_bytes += len(pages) * PAGE_SIZE
        if self._send_time > 0.005:
            self.stats.bandwidth = self._send_bytes / self._send_time

    def tick(self) -> None:
        if self.done:
            return
        now = time.monotonic()
        self._guest_time += now - self._last_tick       # the guest's time since the last tick
        try:
            # The sender's time is kept to its share: half, more as auto-converge cuts the guest's.
            guest = (1 - SENDER_SHARE) * (1 - self.stats.throttle)
            allowed = self._guest_time * (1 - guest) / guest - self._spent
            if allowed > 0:
                end = now + allowed
                while True:
                    if not self._pending:
                        if self._next_round():
                            return
                        if self.stats.throttle:          # throttled: the guest waits anyway
                            time.sleep(max(0.0, min(end - time.monotonic(), MAX_TICK)))
                        break
                    if self.max_bandwidth and self._send_bytes >= (now - self._started) * self.max_bandwidth:
                        if self.stats.throttle:          # the link is the limit: the guest waits
                            time.sleep(max(0.0, min(end - time.monotonic(), MAX_TICK)))
                        break
                    part, self._pending = self._pending[:PAGES_PER_FRAME], self._pending[PAGES_PER_FRAME:]
                    self._send_pages(part)
                    if time.monotonic() >= end:
                        break
                self._spent += time.monotonic() - now
            if now - self._started > self.timeout:
                if self.on_timeout == "force":
                    self._finish()
                else:
                    self._abandon("cancelled", "the migration timed out and was cancelled")
        except (MigrationError, OSError) as e:
            self._fail(e)
        finally:
            self._last_tick = time.monotonic()

    def _next_round(self) -> bool:
        """A round was sent: take the next from the log, or finish; True when done."""
        dirty = sorted(self.vm.board.bus.harvest_dirty())
        left = len(dirty) * PAGE_SIZE
        bw = min(self.stats.bandwidth or 1 << 30, self.max_bandwidth or 1 << 40)
        if left / bw <= self.downtime:
            self._pending = dirty
            self._finish()
            return True
        history = self.stats.history
        if self.auto_converge and history and len(dirty) > history[-1] * 0.9:
            self._stuck += 1
            if self._stuck >= 2:
                steps = [s for s in THROTTLE_STEPS if s > self.stats.throttle]
                if steps:
                    self.stats.throttle = steps[0]
                self._stuck = 0
        self._pending = dirty
        self.stats.rounds += 1
        history.append(len(dirty))
        return False

    def _finish(self) -> None:
        """The stop-and-copy phase, at a slice boundary: the guest does not run during it."""
        vm = self.vm
        board = vm.board
        t0 = time.monotonic()
        board.clock.pause()
        try:
            self._send_pages(sorted(set(self._pending) | board.bus.harvest_dirty()))
            self._pending = []
            state = json.dumps(board.save_state(), default=encode_bytes).encode()
            self.stats.bytes_sent += send_frame(self.sock, STATE, self._cctx.compress(state))
            send_frame(self.sock, COMPLETE)
            self.sock.settimeout(60)
            recv_frame(self.sock, (READY,))
            send_frame(self.sock, GO)
        except (MigrationError, OSError) as e:
            board.clock.resume()
            self._fail(e)
            return
        self.stats.downtime_seconds = time.monotonic() - t0
        board.bus.stop_dirty_log()
        self._end("completed")
        vm.migrated = True
        vm.request_quit()                 # the clock stays stopped: this VM runs no more

    def _abandon(self, outcome: str, why: str) -> None:
        try:
            send_frame(self.sock, ABANDON)
        except OSError:
            pass
        self.stats.error = why
        self.vm.board.bus.stop_dirty_log()
        self._end(outcome)

    def _fail(self, e: BaseException) -> None:
        self._abandon("failed", str(e) if isinstance(e, MigrationError) else f"migration connection failed: {e}")

    def _end(self, outcome: str) -> None:
        self.done = True
        self.stats.outcome = outcome
        self.stats.total_seconds = time.monotonic() - self._started
        self.stats.guest_instructions = self.vm.stats.instructions - self._instructions
        self.stats.throttle = self.stats.throttle if outcome == "completed" else 0.0
        try:
            self.sock.close()
        except OSError:
            pass
        if self.finished is not None:
            self.finished(self.stats)

    def attach(self) -> None:
        """Start (the handshake) and drive the rest from the VM's run loop, between slices."""
        from pyvirt.vmm.vm import Watch
        self.start()
        if self.done:
            return
        watch = Watch(lambda: [], lambda ready: None, None)

        def on_tick() -> None:
            self.tick()
            if self.done and watch in self.vm.watches:
                self.vm.watches.remove(watch)
        watch.on_tick = on_tick
        self.vm.watches.append(watch)

    def cancel(self) -> None:
        if not self.done:
            self._abandon("cancelled", "the migration was cancelled")


# -- the destination ----------------------------------------------------------------------------------
def default_accept(spec_json: Any) -> VmSpec:
    from pydantic import ValidationError

    from pyvirt.machine.riscv_virt import VirtBoard
    try:
        spec = VmSpec.model_validate(spec_json)
    except ValidationError as e:
        err = e.errors()[0]
        raise MigrationError(f"invalid spec: {'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}") from None
    VirtBoard.check_devices(spec)
    return spec


def _refuse(sock: socket.socket, e: BaseException) -> MigrationError:
    """Tell the source why (best effort); the error to raise here."""
    if isinstance(e, OSError) and not isinstance(e, PyvirtError):
        return MigrationError(f"migration connection failed: {e.strerror or e}")
    try:
        send_frame(sock, ERROR, str(e).encode()[:1000])
    except OSError:
        pass
    return e if isinstance(e, MigrationError) else MigrationError(str(e))


def accept_handshake(sock: socket.socket, token: str, accept: Callable[[Any], VmSpec] = default_accept,
                     timeout: float = 60, greeting: dict[str, Any] | None = None) -> VmSpec:
    """The destination's first half: the greeting (protocol, version, token) and the spec
    (`accept` turns it into the spec to run here, or raises); both answered OK.  `greeting`
    gets the greeting's "cold" (a stopped VM: only the definition moves, see `send_cold`)."""
    sock.settimeout(timeout)
    try:
        _, raw = recv_frame(sock, (HELLO,), MAX_HELLO)
        try:
            hello = json.loads(raw)
        except (ValueError, RecursionError):           # (RecursionError: "[[[[..." nested too deep)
            hello = None
        if not isinstance(hello, dict):
            raise MigrationError("bad migration stream: the greeting is not a JSON object")
        if hello.get("protocol") != PROTOCOL:
            raise MigrationError("not a pyvirt migration stream")
        if hello.get("version") != VERSION:
            raise MigrationError(f"migration protocol version {hello.get('version')!r} is not supported "
                                 f"(this pyvirt speaks {VERSION})")
        if not isinstance(hello.get("token"), str) or not hmac.compare_digest(hello["token"].encode(),
                                                                             token.encode()):
            raise MigrationError("wrong migration token")
        if greeting is not None:
            greeting["cold"] = hello.get("cold") is True
        send_frame(sock, OK)
        _, raw = recv_frame(sock, (SPEC,), MAX_HELLO)
        try:
            spec = accept(json.loads(raw))
        except (ValueError, RecursionError, PyvirtError) as e:
            raise MigrationError(f"the spec cannot run here: {e}") from None
        send_frame(sock, OK)
        return spec
    except (PyvirtError, OSError) as e:
        raise _refuse(sock, e) from None


def receive_machine(sock: socket.socket, spec: VmSpec, console: CharBackend, timeout: float = 60) -> Any:
    """The destination's second half: pages, state, COMPLETE -> the board built and loaded ->
    READY, then GO; returns the Vm, not yet running.  Nothing stays open on failure."""
    from pyvirt.vmm.resources import build_board
    from pyvirt.vmm.snapcheck import check_state
    from pyvirt.vmm.vm import Vm

    sock.settimeout(timeout)
    try:
        ram = mmap.mmap(-1, spec.memory + RAM_TAIL)
        npages = spec.memory // PAGE_SIZE
        state_raw = None
        while True:
            kind, payload = recv_frame(sock, (PAGES, STATE, COMPLETE, ABANDON))
            if kind == PAGES:
                apply_pages(ram, npages, payload)
            elif kind == STATE:
                state_raw = _decompress(payload, MAX_STATE, "state")
            elif kind == ABANDON:
                raise MigrationError("the source abandoned the migration")
            else:
                break
        if state_raw is None:
            raise MigrationError("bad migration stream: COMPLETE without the machine's state")
        try:
            state = json.loads(state_raw)
        except (ValueError, RecursionError):
            raise MigrationError("bad migration stream: the state is not JSON") from None
        board = build_board(spec, console, ram=ram, restore=True)
        try:
            try:
                board.load_state(check_state(board, state))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise MigrationError(f"bad migration stream: the state does not fit the machine: {e}") from None
            except PyvirtError as e:
                raise MigrationError(f"bad migration stream: {e}") from None
            send_frame(sock, READY)
            recv_frame(sock, (GO,))
        except BaseException:
            board.close()
            raise
        return Vm(spec, console, board=board)
    except (PyvirtError, OSError) as e:
        raise _refuse(sock, e) from None


def receive(sock: socket.socket, token: str, console: CharBackend,
            accept: Callable[[Any], VmSpec] = default_accept, timeout: float = 60) -> Any:
    """Serve one incoming migration on `sock`; returns the new Vm, built and loaded, not yet
    running (the caller runs it and then `announce()`s it).  Any problem is one MigrationError
    (the source was told why); nothing stays open."""
    spec = accept_handshake(sock, token, accept, timeout)
    return receive_machine(sock, spec, console, timeout)


def send_cold(sock: socket.socket, token: str, spec_json: dict[str, Any]) -> None:
    """Move a stopped VM's definition: HELLO (cold), SPEC, COMPLETE -> READY (recorded there)
    -> GO.  MigrationError with the destination's reason if it refused."""
    sock.settimeout(30)
    try:
        send_frame(sock, HELLO, json.dumps({"protocol": PROTOCOL, "version": VERSION, "token": token,
                                            "cold": True}).encode())
        recv_frame(sock, (OK,))
        send_frame(sock, SPEC, json.dumps(spec_json).encode())
        recv_frame(sock, (OK,))
        send_frame(sock, COMPLETE)
        recv_frame(sock, (READY,))
        send_frame(sock, GO)
    except OSError as e:
        raise MigrationError(f"migration connection failed: {e.strerror or e}") from None


def receive_cold(sock: socket.socket) -> None:
    """The destination's side of `send_cold` after the handshake: COMPLETE -> READY -> GO."""
    try:
        recv_frame(sock, (COMPLETE,))
        send_frame(sock, READY)
        recv_frame(sock, (GO,))
    except OSError as e:
        raise MigrationError(f"migration connection failed: {e.strerror or e}") from None


def announce(vm: Any) -> None:
    """After the destination resumed: every NIC tells the network where the guest's MAC is."""
    for nic in getattr(vm.board, "nics", []):
        nic.backend.send(rarp_announce(nic.mac))
