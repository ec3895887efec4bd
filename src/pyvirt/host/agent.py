"""The host side of the guest agent protocol (docs/agent.md), over a VM's vsock socket.

Each request is one vsock connection to the agent's port (`AGENT_VSOCK_PORT`) through
the VMM's Unix socket (backends/vsock.py's `connect_guest`).  The agent is as hostile as
the guest: every frame it sends is checked (length at most `MAX_PAYLOAD`, a type the
request expects, field sizes), a file it sends is written only to the destination the
user named (through a temporary file beside it, renamed at the end, never more bytes
than it announced, set-id bits dropped), and anything else ends the request with one
`AgentError` line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvirt.backends.vsock import connect_guest
from pyvirt.errors import PyvirtError
from pyvirt.spec import VmSpec, VsockSpec

log = logging.getLogger(__name__)

AGENT_VSOCK_PORT = 1024
PROTOCOL = "pyvirt-agent 1"
MAX_PAYLOAD = 65536
MAX_ARGV = 256
FRAME = struct.Struct("<IB")
REQUEST_TIMEOUT = 30.0
CLOCK_TRIES = 4                      # set_clock: how many times the host's time is sent at most,
CLOCK_CLOSE = 0.05                   # while the guest takes longer than this (s) to answer


def with_vsock(spec: VmSpec, sock: Path) -> VmSpec:
    """A pyvirtd VM's spec: a virtio-vsock device on `sock` (its runner's directory)."""
    return spec.model_copy(update={"vsock": VsockSpec(socket=sock)})


class AgentError(PyvirtError):
    """The agent refused a request, broke the protocol or cannot be reached (one line)."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            b = sock.recv(n - len(out))
        except TimeoutError:
            raise AgentError("the guest agent did not answer in time") from None
        except OSError as e:
            raise AgentError(f"the connection to the guest agent failed: {e.strerror or e}") from None
        if not b:
            raise AgentError("the guest agent closed the connection")
        out += b
    return bytes(out)


class AgentConnection:
    """One request's connection: frames both ways, the agent's greeting checked."""

    def __init__(self, vsock_path: str | Path, timeout: float | None = REQUEST_TIMEOUT,
                 connect_timeout: float = 5.0) -> None:
        try:
            self.sock, _ = connect_guest(vsock_path, AGENT_VSOCK_PORT, connect_timeout)
        except OSError as e:
            raise AgentError(f"the guest agent is not reachable: {e.strerror or e}") from None
        self.sock.settimeout(timeout)
        typ, data = self.recv()
        if typ != "V" or data.decode(errors="replace").split(" ")[:2] != PROTOCOL.split(" "):
            self.close()
            raise AgentError(f"the guest agent speaks {data[:40].decode(errors='replace')!r}, "
                             f"not {PROTOCOL!r}")
        self.version = data.decode()

    def send(self, typ: str, payload: bytes = b"") -> None:
        if len(payload) > MAX_PAYLOAD:
            raise AgentError(f"a request frame of {len(payload)} bytes is over {MAX_PAYLOAD}")
        try:
            self.sock.sendall(FRAME.pack(len(payload), ord(typ)) + payload)
        except OSError as e:
            raise AgentError(f"the connection to the guest agent failed: {e.strerror or e}") from None

    def recv(self) -> tuple[str, bytes]:
        n, typ = FRAME.unpack(_recv_exact(self.sock, FRAME.size))
        if n > MAX_PAYLOAD:
            raise AgentError(f"the guest agent sent a frame of {n} bytes (at most {MAX_PAYLOAD})")
        return chr(typ), _recv_exact(self.sock, n)

    def expect(self, *types: str) -> tuple[str, bytes]:
        """The next frame, which must be one of `types` (or 'X', raised as its message)."""
        typ, data = self.recv()
        if typ == "X":
            raise AgentError(_text(data))
        if typ not in types:
            raise AgentError(f"the guest agent answered with an unexpected frame {typ!r}")
        return typ, data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)        # wakes a thread blocked on it
        self.sock.close()

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(data: bytes, limit: int = 300) -> str:
    """The agent's message as one printable line."""
    s = data[:limit].decode(errors="replace")
    return "".join(c if c.isprintable() else "?" for c in s) or "the guest agent reported an error"


@dataclass
class ExecEvent:
    """One piece of an exec: output on stream 1 or 2, or the end (`exit`)."""

    stream: int = 0                  # 1 stdout, 2 stderr, 0 the end
    data: bytes = b""
    code: int = 0                    # exit status, when the command exited
    signal: int = 0                  # the signal that ended it, or 0

    @property
    def status(self) -> int:
        """What a shell would report: the status, or 128 + the signal."""
        return 128 + self.signal if self.signal else self.code


class ExecStream:
    """A running command in the guest: its output as events, its stdin, window and signals.
    Subclasses carry the frames: `_frame()` the next one from the agent (type, payload),
    `_send()` one to it."""

    result: ExecEvent | None = None

    def _frame(self) -> tuple[str, bytes]:
        raise NotImplementedError

    def _send(self, typ: str, payload: bytes = b"") -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def events(self) -> Iterator[ExecEvent]:
        while self.result is None:
            typ, data = self._frame()
            if typ == "x":
                if len(data) != 5:
                    raise AgentError("the guest agent sent a malformed exit status")
                code, sig = struct.unpack("<IB", data)
                if code > 255 or sig > 64:
                    raise AgentError("the guest agent sent an impossible exit status")
                self.result = ExecEvent(0, b"", code, sig)
                yield self.result
            elif typ in ("1", "2"):
                yield ExecEvent(int(typ), data)
            else:
                raise AgentError(f"the guest agent answered with an unexpected frame {typ!r}")

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_PAYLOAD):
            self._send("I", data[i:i + MAX_PAYLOAD])

    def close_stdin(self) -> None:
        self._send("I")

    def resize(self, rows: int, cols: int) -> None:
        self._send("W", struct.pack("<HH", rows & 0xFFFF, cols & 0xFFFF))

    def kill(self, sig: int) -> None:
        self._send("K", bytes([sig & 0x7F]))

    def collect(self, input: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Feed `input` (if the command takes stdin), wait for the end: (status as a shell
        reports it, stdout, stderr); the stream is closed after."""
        out, err = bytearray(), bytearray()
        try:
            if input is not None:
                self.write(input)
                self.close_stdin()
            for ev in self.events():
                (out if ev.stream == 1 else err).extend(ev.data)
            assert self.result is not None
            return self.result.status, bytes(out), bytes(err)
        finally:
            self.close()


class ExecSession(ExecStream):
    """An exec straight over the agent's connection."""

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn

    def _frame(self) -> tuple[str, bytes]:
        return self.conn.expect("1", "2", "x")

    def _send(self, typ: str, payload: bytes = b"") -> None:
        self.conn.send(typ, payload)

    def close(self) -> None:
        self.conn.close()


class Agent:
    """The agent of one VM, reached through its vsock Unix socket."""

    def __init__(self, vsock_path: str | Path) -> None:
        self.path = Path(vsock_path)

    def connect(self, timeout: float | None = REQUEST_TIMEOUT) -> AgentConnection:
        return AgentConnection(self.path, timeout)

    def wait(self, timeout: float = 30.0) -> str:
        """Wait until the agent answers (a booting guest); its version.  AgentError if not."""
        end = time.monotonic() + timeout
        while True:
            try:
                with self.connect(timeout=5.0) as c:
                    return c.version
            except AgentError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)

    # -- exec --------------------------------------------------------------------------
    def exec(self, argv: list[str], tty: bool = False, stdin: bool = False,
             size: tuple[int, int] = (24, 80), timeout: float | None = None) -> ExecSession:
        """Start `argv`; `timeout`: seconds the agent may stay silent (None: no limit)."""
        payload = exec_payload(argv, tty, stdin, size)
        conn = self.connect(timeout=timeout)
        try:
            conn.send("E", payload)
        except BaseException:
            conn.close()
            raise
        return ExecSession(conn)

    def run(self, argv: list[str], input: bytes | None = None,
            timeout: float | None = None) -> tuple[int, bytes, bytes]:
        """Run `argv` to its end: (status as a shell reports it, stdout, stderr)."""
        return self.exec(argv, stdin=input is not None, timeout=timeout).collect(input)

    # -- files -------------------------------------------------------------------------
    def read_file(self, guest_path: str, dest: str | Path) -> int:
        """Copy the guest's file `guest_path` to the host path `dest` (see `save_local`).
        Returns the bytes copied."""
        target = local_target(guest_path, dest)
        with self.connect() as c:
            c.send("R", _path(guest_path))
            _, meta = c.expect("M")
            if len(meta) != 12:
                raise AgentError("the guest agent sent malformed file information")
            mode, lo, hi = struct.unpack("<III", meta)

            def chunks() -> Iterator[bytes]:
                while (frame := c.expect("D", "Z"))[0] == "D":
                    yield frame[1]

            return save_local(target, guest_path, lo | hi << 32, mode, chunks())

    def write_file(self, src: str | Path, guest_path: str, mode: int | None = None) -> int:
        """Copy the host file `src` to `guest_path` in the guest (its mode, or `mode`)."""
        try:
            f = open(src, "rb")
        except OSError as e:
            raise AgentError(f"{src}: {e.strerror}") from None
        with f, self.connect() as c:
            st = os.fstat(f.fileno())
            m = (st.st_mode & 0o7777) if mode is None else mode & 0o7777
            c.send("P", struct.pack("<I", m) + _path(guest_path))
            sent = 0
            while chunk := f.read(MAX_PAYLOAD):
                c.send("D", chunk)
                sent += len(chunk)
            c.send("Z")
            c.expect("Z")
            return sent

    # -- small requests ----------------------------------------------------------------
    def _simple(self, typ: str, payload: bytes = b"") -> bytes:
        with self.connect() as c:
            c.send(typ, payload)
            return c.expect("Z", "T")[1]

    def listening_ports(self) -> list[int]:
        """TCP ports something listens on in the guest (IPv4 and IPv6)."""
        text = self._simple("L").decode(errors="replace")
        ports = {int(w) for w in text.split() if w.isascii() and w.isdigit() and len(w) <= 5 and 0 < int(w) < 65536}
        return sorted(ports)

    def set_clock(self, when: float | None = None) -> float:
        """Set the guest's wall clock to `when`, or to the host's; returns the last round trip.

        The agent sets what it was sent when it reads it, so the guest's clock ends behind the
        host's by up to the round trip.  A guest just restored on a busy host or a slower
        engine took seconds for the first one; while the round trip is over CLOCK_CLOSE, the
        host's time is sent again (at most CLOCK_TRIES times): the later ones find the agent's
        code paths warm."""
        for _ in range(1 if when is not None else CLOCK_TRIES):
            with self.connect() as c:
                t0 = time.monotonic()
                t = time.time() if when is None else when
                sec = int(t)
                c.send("C", struct.pack("<qI", sec, int((t - sec) * 1e9)))
                c.expect("Z")
                took = time.monotonic() - t0
            if took <= CLOCK_CLOSE:
                break
        return took

    def set_hostname(self, name: str) -> None:
        self._simple("H", name.encode())

    def set_mac(self, ifname: str, mac: str) -> None:
        self._simple("A", f"{ifname} {mac}".encode())

    def freeze(self, mountpoint: str = "/") -> None:
        self._simple("F", mountpoint.encode())

    def thaw(self, mountpoint: str = "/") -> None:
        self._simple("U", mountpoint.encode())

    def poweroff(self, connect_timeout: float = 5.0) -> None:
        """Ask the guest to sync and power off (the agent answers first)."""
        with AgentConnection(self.path, REQUEST_TIMEOUT, connect_timeout) as c:
            c.send("O")
            c.expect("Z")


# -- file systems frozen around a snapshot (docs/agent.md, request Q) ---------------------
FREEZE_FEATURE = "freeze"           # the greeting's word for an agent that serves Q
FREEZE_TIMEOUT = 30.0               # seconds for the guest to sync and freeze (and to thaw)
FREEZE_CONNECT_TIMEOUT = 2.0        # a guest whose agent does not answer costs this much


@dataclass
class Freeze:
    """What `frozen_filesystems` did, for the snapshot's result: the mount points frozen
    (None: nothing was frozen, `note` says why) and whether they were thawed after."""

    frozen: list[str] | None = None
    thawed: bool = False
    note: str = ""

    def describe(self) -> str:
        if self.frozen is None:
            return f"not frozen: {self.note}"
        if not self.frozen:
            return "not frozen: the guest has no writable block-backed file system that can be frozen"
        what = "froze " + ", ".join(self.frozen)
        return what + (" (thawed after the snapshot)" if self.thawed else f" (thaw: {self.note})")


@contextlib.contextmanager
def frozen_filesystems(agent: Agent) -> Iterator[Freeze]:
    """The guest's writable block-backed file systems frozen (FIFREEZE) by its agent for the
    time of the block, thawed after it -- also when the block fails; the agent thaws them by
    itself if the host goes away or takes over 30 s.  A guest whose agent does not answer
    or cannot freeze is not frozen (the Freeze says why); nothing here raises."""
    result = Freeze()
    try:
        conn = AgentConnection(agent.path, FREEZE_TIMEOUT, FREEZE_CONNECT_TIMEOUT)
    except AgentError as e:
        result.note = f"the guest agent did not answer ({e})"
        yield result
        return
    with conn:
        if FREEZE_FEATURE not in conn.version.split()[2:]:
            result.note = f"the guest agent ({conn.version[:40]!r}) cannot freeze file systems"
            yield result
            return
        try:
            conn.send("Q")
            text = conn.expect("T")[1].decode(errors="replace")
        except AgentError as e:
            result.note = f"the guest agent could not freeze: {e}"
            yield result                        # (closing the connection thaws what it froze)
            return
        result.frozen = [_text(line.encode(), 200) for line in text.splitlines()[:64] if line]
        try:
            yield result
        finally:
            try:
                conn.send("U")
                conn.expect("Z")
                result.thawed = True
            except AgentError as e:
                result.note = str(e)
                log.warning("the guest's file systems may not be thawed: %s", e)


# -- shared folders around a snapshot (docs/shares.md, "Snapshots") ----------------------
# virtiofsd's FUSE session (node IDs, open handles) cannot be saved, so the guest lets go of
# it: its virtiofs mounts are written to SHARES_FILE (guest tmpfs: it is in the snapshot's
# RAM too), synced and unmounted, innermost first; a busy one (open files, a working
# directory) stops it all, remounts what it had unmounted and names the share.  After the
# snapshot the source mounts them again, and so does each VM restored or cloned from it
# (its fresh virtiofsd answers the new FUSE session).  Plain sh: busybox's and Debian's.
SHARES_FILE = "/run/pyvirt-shares"
_UNMOUNT = "f=" + SHARES_FILE + r"""; mkdir -p /run || exit 1
awk '$3 == "virtiofs" {print $1, $2, $4}' /proc/mounts | sed -n '1!G;h;$p' > $f.new || exit 1
sync
gone=""
while read -r tag dir opts; do
  if umount "$dir" 2>/dev/null; then gone="$tag $dir $opts
$gone"; continue; fi
  printf '%s' "$gone" | while read -r t d o; do [ -n "$t" ] && mount -t virtiofs -o "$o" "$t" "$d"; done
  rm -f $f.new
  echo "share $tag is busy in the guest (a file open or a working directory under $dir)"; exit 3
done < $f.new
mv $f.new $f
"""
_REMOUNT = "f=" + SHARES_FILE + r"""; [ -f $f ] || exit 0
rc=0
sed -n '1!G;h;$p' $f > $f.up
while read -r tag dir opts; do
  awk -v d="$dir" '$2 == d && $3 == "virtiofs" {x=1} END {exit !x}' /proc/mounts && continue
  mount -t virtiofs -o "$opts" "$tag" "$dir" 2>/dev/null || { echo "share $tag: cannot mount it on $dir again"; rc=1; }
done < $f.up
rm -f $f $f.up
exit $rc
"""


def unmount_shares(agent: Agent) -> None:
    """Sync and unmount every virtio-fs share in the guest, noting them for `remount_shares`
    (AgentError with one line naming a busy share: then nothing stays unmounted)."""
    _share_script(agent, _UNMOUNT, "unmount")


def remount_shares(agent: Agent) -> None:
    """Mount again the shares `unmount_shares` noted (nothing if it noted none)."""
    _share_script(agent, _REMOUNT, "mount again")


SHARE_SCRIPT_TIMEOUT = 120.0        # seconds for the guest's sync and (un)mounts


def _share_script(agent: Agent, script: str, what: str) -> None:
    """Run a share script; its last line of output is the one-line error when it fails."""
    code, out, err = agent.run(["sh", "-c", script], timeout=SHARE_SCRIPT_TIMEOUT)
    if code != 0:
        lines = (out or err).decode(errors="replace").strip().splitlines()
        why = _text(lines[-1].encode()) if lines else f"status {code}"
        raise AgentError(why if out.strip() else f"the guest could not {what} its shares: {why}")


AFTER_RESTORE_TIMEOUT = 10.0
LATE_TIMEOUT = 300.0     # how long a VM whose agent missed AFTER_RESTORE_TIMEOUT is waited for


@dataclass
class Restored:
    """A VM just restored or cloned from a snapshot, for `after_restore`: its vsock socket,
    its name (the host name it takes), the MACs its NICs take (a clone: new ones; eth0
    first) and whether it has shared folders to mount again."""

    sock: Path
    name: str
    macs: list[str]
    shares: bool = False


def after_restore(vms: list[Restored]) -> list[str]:
    """Bring VMs just restored or cloned from a snapshot up to date through their guest
    agents, all at once: the wall clock set to the host's (the snapshot's is stale), the host
    name to the VM's, each NIC's MAC, then their shares mounted again.  Returns the names of
    the VMs whose agent did not answer in AFTER_RESTORE_TIMEOUT (logged; the caller may try
    the console-port agent for them, which sets no clock).  Those are not given up: a thread
    each waits up to LATE_TIMEOUT more and brings them up to date when their agent answers
    (a busy host or a slower engine: four jit clones' agents took over 10 s, and their clocks
    stayed the snapshot's, 21 s behind)."""
    import threading

    failed: list[str] = []

    def one(vm: Restored) -> None:
        try:
            _bring_up_to_date(vm, AFTER_RESTORE_TIMEOUT)
        except AgentError as e:
            log.warning("VM %s: the guest agent did not take its clock, host name and MACs yet: %s", vm.name, e)
            failed.append(vm.name)
            threading.Thread(target=late, args=(vm,), name=f"after-restore-{vm.name}", daemon=True).start()

    def late(vm: Restored) -> None:
        try:
            _bring_up_to_date(vm, LATE_TIMEOUT)
            log.info("VM %s: the guest agent answered late; its clock, host name and MACs are set", vm.name)
        except AgentError as e:
            log.warning("VM %s: the guest agent never answered; its clock stays the snapshot's: %s", vm.name, e)

    threads = [threading.Thread(target=one, args=(vm,)) for vm in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


def _bring_up_to_date(vm: Restored, wait: float) -> None:
    """after_restore's work for one VM, once its agent answers within `wait` s (AgentError if
    it does not); a share that does not mount again is logged, not raised."""
    agent = Agent(vm.sock)
    agent.wait(wait)
    agent.set_clock()
    agent.set_hostname(vm.name)
    for i, mac in enumerate(vm.macs):
        agent.set_mac(f"eth{i}", mac)
    if vm.shares:
        try:
            remount_shares(agent)
        except AgentError as e:
            log.warning("VM %s: its shared folders are not mounted again: %s", vm.name, e)


def local_target(guest_path: str, dest: str | Path) -> Path:
    """Where a copy from the guest goes: `dest`, or -- an existing directory -- the guest
    file's base name in it.  Only the user's words decide it, never the guest's."""
    target = Path(dest)
    if target.is_dir():
        name = guest_path.rstrip("/").rsplit("/", 1)[-1]
        if name in ("", ".", ".."):
            raise AgentError(f"{guest_path}: no file name to copy to {dest}")
        target = target / name
    if target.exists() and not target.is_file():
        raise AgentError(f"{dest}: not a regular file")
    return target


def save_local(target: Path, guest_path: str, size: int, mode: int, chunks: Iterator[bytes]) -> int:
    """Write what the guest sends to `target`: through a temporary file beside it, which
    replaces `target` only once exactly `size` bytes came (never more is written); its mode
    `mode` without set-id bits.  Returns the bytes written."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".pyvirt-cp", dir=target.parent)
    except OSError as e:
        raise AgentError(f"{target}: {e.strerror}") from None
    try:
        got = 0
        with os.fdopen(fd, "wb") as f:
            for data in chunks:
                got += len(data)
                if got > size:
                    raise AgentError(f"{guest_path}: the guest agent sent more than the "
                                     f"{size} bytes it announced")
                f.write(data)
        if got != size:
            raise AgentError(f"{guest_path}: the file changed while it was copied ({got} of {size} bytes)")
        os.chmod(tmp, mode & 0o777)
        os.replace(tmp, target)
    except OSError as e:
        _remove(tmp)
        raise AgentError(f"{target}: {e.strerror}") from None
    except BaseException:
        _remove(tmp)
        raise
    return got


def exec_payload(argv: Any, tty: bool, stdin: bool, size: tuple[int, int]) -> bytes:
    """The `E` request's payload (AgentError for a command the protocol cannot carry)."""
    if not isinstance(argv, list) or not argv or len(argv) > MAX_ARGV \
            or not all(isinstance(a, str) for a in argv):
        raise AgentError(f"a command is a list of 1 to {MAX_ARGV} words")
    if any("\0" in a for a in argv):
        raise AgentError("a command word cannot hold a NUL byte")
    payload = struct.pack("<BHH", (1 if tty else 0) | (2 if stdin else 0), size[0] & 0xFFFF, size[1] & 0xFFFF) \
        + b"".join(a.encode(errors="surrogateescape") + b"\0" for a in argv)
    if len(payload) > MAX_PAYLOAD:
        raise AgentError(f"the command is over {MAX_PAYLOAD} bytes")
    return payload


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _path(p: str) -> bytes:
    b = p.encode()
    if not b or b"\0" in b or len(b) > 4000:
        raise AgentError(f"{p!r}: not a guest path")
    return b
