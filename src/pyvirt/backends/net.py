"""Network backends: where a virtio-net device's Ethernet frames come from and go to.

A `NetBackend` knows nothing about virtio.  It takes whole frames with
`send()`, writes what it has taken by the end of `flush()` at the latest,
hands over whole frames from the host with `recv()` (never blocking),
exposes a file descriptor the VMM's idle wait can watch, says whether the
link is up, and releases everything in `close()`.  The device flushes once
per poll (between CPU slices), so a stream back end writes the frames a
guest sent during one slice with one system call -- and wakes its peer
(passt, the switch) once for them -- instead of once per frame.

* `StreamBackend` -- a connected Unix stream socket carrying QEMU's
  `-netdev stream` framing: every frame is preceded by its length as a
  4-byte big-endian integer.  passt speaks the same framing on its socket.
* `PasstBackend` -- user-mode networking: starts Debian's `passt` with one
  end of a socket pair (`passt --fd`), talks to it through a
  `StreamBackend`, and stops it on close.  Host ports can be forwarded to
  the guest (`passt -t 127.0.0.1/HOST:GUEST`).
* `TapBackend` -- a host TAP interface (/dev/net/tun, IFF_TAP|IFF_NO_PI):
  one read or write is one frame.

Frames from the host are untrusted too: a stream peer announcing a frame
longer than `MAX_FRAME` is disconnected (the link goes down) rather than
believed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pyvirt.errors import ConfigError
from pyvirt.fsutil import end_process
from pyvirt.stream import BufferedStream

log = logging.getLogger(__name__)

MAX_FRAME = 65535              # the longest frame either side may send
MIN_FRAME = 14                 # an Ethernet header
LENGTH = struct.Struct(">I")   # -netdev stream's frame prefix
MAX_OUT = 1 << 20              # bytes queued towards a stream peer before send() says "full"
FLUSH_AT = 64 * 1024           # send() writes at once when this much is queued (else flush() does)
RECV_CHUNK = 256 * 1024        # what one read from a stream peer takes at most
PASST_START_TIMEOUT = 10.0


class NetBackend(Protocol):
    """The host side of one network interface."""

    link_up: bool

    def send(self, frame: bytes) -> bool:
        """Queue one frame for the host; False (nothing taken) when the host is not keeping
        up.  A frame for a link that is down is taken and dropped."""
        ...

    def flush(self) -> None:
        """Write what `send()` queued, as far as the host takes it now (never blocking)."""
        ...

    def recv(self, limit: int) -> list[bytes]:
        """Up to `limit` whole frames from the host, without blocking."""
        ...

    def fileno(self) -> int | None:
        """A descriptor that becomes readable when frames arrive (None: nothing to watch)."""
        ...

    def close(self) -> None:
        ...


class StreamBackend:
    """Frames over a connected stream socket, each preceded by a 4-byte big-endian length.

    Partial reads and writes are carried over between calls; output waiting
    for the peer is bounded by `MAX_OUT`.  `send()` only queues (up to
    `FLUSH_AT` bytes): `flush()` -- or the next `recv()` -- writes.  End of file, a socket error, or
    a peer announcing a frame over `MAX_FRAME` bytes puts the link down for
    good (the socket is closed); frames sent then are dropped.
    """

    def __init__(self, sock: socket.socket, name: str = "stream") -> None:
        self.stream = BufferedStream(sock, MAX_OUT)
        self.name = name
        self.inbuf = bytearray()       # bytes read from the peer, frames not yet taken from inpos on
        self.inpos = 0
        self._chunk = memoryview(bytearray(RECV_CHUNK))    # what one read fills
        self.link_up = True
        self.stats = {"rx_frames": 0, "tx_frames": 0, "tx_dropped": 0, "rx_empty": 0}

    @classmethod
    def connect(cls, path: str | Path) -> StreamBackend:
        """Connect to a Unix stream socket someone else listens on (a `-netdev stream` server)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
        except OSError as e:
            s.close()
            raise ConfigError(f"cannot connect to network socket {path}: {e.strerror}") from None
        return cls(s, name=str(path))

    @property
    def out(self) -> bytearray:
        """Output waiting for the peer."""
        return self.stream.out

    def _down(self, why: str) -> None:
        if self.link_up:
            log.warning("network %s: %s; link down", self.name, why)
        self.link_up = False
        self.stream.close()
        self.inbuf.clear()
        self.inpos = 0

    # -- to the peer ---------------------------------------------------------------------
    def send(self, frame: bytes) -> bool:
        if not self.link_up:
            self.stats["tx_dropped"] += 1
            return True
        if len(frame) > MAX_FRAME:
            self.stats["tx_dropped"] += 1
            return True
        if self.stream.full():
            self.flush()
            if self.stream.full():
                return False
        self.stream.queue(LENGTH.pack(len(frame)))
        self.stream.queue(frame)
        self.stats["tx_frames"] += 1
        if len(self.stream.out) >= FLUSH_AT:
            self.flush()
        return True

    def flush(self) -> None:
        """Write what the socket takes now of the queued output."""
        error = self.stream.flush()
        if error is not None:
            self._down(f"send failed: {error.strerror}")

    # -- from the peer --------------------------------------------------------------------
    def recv(self, limit: int) -> list[bytes]:
        self.flush()
        frames: list[bytes] = []
        taken = 0                  # frames taken, empty ones too: a peer sending only empty
        drained = False            # a read came back short: the socket had no more just now
        while not self.stream.closed:                     # frames cannot keep us here
            taken = self._take_frames(frames, taken, limit)
            if taken >= limit or self.stream.closed or drained:   # (closed: the framing broke)
                break
            got = self.stream.recv_into(self._chunk)
            if isinstance(got, OSError):
                self._down(f"receive failed: {got.strerror}")
                break
            if got is None:
                self._down("the peer closed the connection")
                break
            if not got:
                break
            if self.inpos:                     # drop the frames taken, once per read
                del self.inbuf[:self.inpos]
                self.inpos = 0
            self.inbuf += self._chunk[:got]
            drained = got < len(self._chunk)  # (another read now would find nothing: a system call saved)
        return frames

    def _take_frames(self, frames: list[bytes], taken: int, limit: int) -> int:
        """Append the whole frames in the input buffer to `frames` (empty ones are counted,
        not kept) until `limit` are taken; returns the new count.  A peer announcing a frame
        over MAX_FRAME puts the link down.  (One loop for a read's frames: the receive path
        of a guest downloading runs it some 25 k times a second.)"""
        buf, pos = self.inbuf, self.inpos
        end = len(buf)
        unpack = LENGTH.unpack_from
        empty = 0
        first = len(frames)
        too_long = 0
        view = memoryview(buf)        # (slices copied once, into bytes)
        try:
            while taken < limit and end - pos >= 4:
                (n,) = unpack(buf, pos)
                if n > MAX_FRAME:
                    too_long = n
                    break
                if end - pos - 4 < n:
                    break
                pos += 4
                if n:
                    frames.append(bytes(view[pos:pos + n]))
                else:
                    empty += 1
                pos += n
                taken += 1
        finally:
            view.release()            # (before _down empties the buffer)
        self.inpos = pos
        self.stats["rx_frames"] += len(frames) - first
        self.stats["rx_empty"] += empty
        if too_long:
            self._down(f"the peer announced a {too_long}-byte frame (more than {MAX_FRAME})")
        return taken

    def fileno(self) -> int | None:
        return self.stream.fileno()

    def close(self) -> None:
        if self.link_up:
            self.stream.flush()            # the last frames, as far as the peer takes them now
        self.stream.close()
        self.link_up = False


# -- passt --------------------------------------------------------------------------------------
def check_host_port_free(port: int, address: str = "127.0.0.1") -> None:
    """Raise ConfigError if a TCP listener already holds `address:port` on the host."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"host port {port} on {address} is already in use") from None
        raise ConfigError(f"cannot use host port {port} on {address}: {e.strerror}") from None
    finally:
        s.close()


def _last_error_line(path: Path) -> str:
    """passt's own last message, without its complaints about a missing syslog."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [ln.strip() for ln in lines if ln.strip() and "syslog" not in ln
             and not ln.startswith("Don't run as root")]
    return lines[-1] if lines else ""


class PasstBackend(StreamBackend):
    """User-mode networking through passt, started for this VM and stopped on close.

    passt gets one end of a Unix socket pair (`--fd`), so no socket file is
    needed; its PID file in a private directory says that it has finished
    setting up (ports bound) and is serving.  As root passt drops to
    `nobody`, so that directory is handed to nobody.  Forwarded ports are
    bound on 127.0.0.1 only.  The guest gets an address, gateway and DNS
    from passt's DHCP server.  The gateway address reaches the host's loopback
    only with `host_loopback` (otherwise passt is started with --no-map-gw: a
    guest reaches no service listening on the host's 127.0.0.1).

    A passt that dies (its socket closes) puts the link down and is started
    again after RESTART_DELAYS (1 s, then longer), from `recv()`: the link
    comes back up with the new one.
    """

    RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)

    def __init__(self, port_forwards: Sequence[tuple[int, int]] = (), mtu: int = 1500,
                 passt: str = "passt", host_loopback: bool = False) -> None:
        self.host_loopback = host_loopback
        self._args = (list(port_forwards), mtu, passt)
        self._restarts = 0
        self._retry_at: float | None = None
        self._closing = False
        super().__init__(self._start(*self._args), name="passt")

    def _down(self, why: str) -> None:
        super()._down(why)
        if self._retry_at is None and not self._closing:
            self._stop()                   # (the dead passt's directory goes too)
            delay = self.RESTART_DELAYS[min(self._restarts, len(self.RESTART_DELAYS) - 1)]
            self._retry_at = time.monotonic() + delay

    def recv(self, limit: int) -> list[bytes]:
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._restarts += 1
            try:
                sock = self._start(*self._args)
            except (ConfigError, OSError) as e:
                log.warning("network passt: cannot restart passt: %s", e)
                delay = self.RESTART_DELAYS[min(self._restarts, len(self.RESTART_DELAYS) - 1)]
                self._retry_at = time.monotonic() + delay
            else:
                self._retry_at = None
                self.stream, self.link_up = BufferedStream(sock, MAX_OUT), True
                log.warning("network passt: restarted; link up")
        return super().recv(limit)

    def _start(self, port_forwards: Sequence[tuple[int, int]], mtu: int, passt: str) -> socket.socket:
        """Start passt; the socket to it once it serves."""
        exe = shutil.which(passt)
        if exe is None:
            raise ConfigError("passt is not installed (scripts/setup-system.sh installs it)")
        for host, _ in port_forwards:
            check_host_port_free(host)
        self.dir = Path(tempfile.mkdtemp(prefix="pyvirt-passt-"))
        self.proc: subprocess.Popen[bytes] | None = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pidfile, logfile = self.dir / "passt.pid", self.dir / "passt.log"
            # The log is made (new, no link followed) while the directory is still ours alone:
            # once it is nobody's, anything running as nobody could put a link there.
            err_fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600)
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            argv = [exe, "--foreground", "--quiet", "--fd", str(theirs.fileno()),
                    "--pid", str(pidfile), "--mtu", str(mtu)]
            for host, guest in port_forwards:
                argv += ["-t", f"127.0.0.1/{host}:{guest}"]
            if not self.host_loopback:
                argv.append("--no-map-gw")        # the gateway is not the host's 127.0.0.1
            with open(err_fd, "wb") as err:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                             pass_fds=[theirs.fileno()], start_new_session=True)
            theirs.close()
            self._wait_ready(pidfile, logfile)
        except BaseException:
            theirs.close()
            ours.close()
            self._stop()
            raise
        return ours

    def _wait_ready(self, pidfile: Path, logfile: Path) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + PASST_START_TIMEOUT
        while not pidfile.exists():
            if self.proc.poll() is not None:
                why = _last_error_line(logfile) or f"exit status {self.proc.returncode}"
                raise ConfigError(f"passt failed to start: {why}")
            if time.monotonic() > deadline:
                raise ConfigError(f"passt did not start within {PASST_START_TIMEOUT:.0f} s")
            time.sleep(0.005)

    def _stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)      # (passt also ends when its socket is closed)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def close(self) -> None:
        self._retry_at = None
        self._closing = True             # (no restart from a _down that close may cause)
        super().close()                  # passt ends when its socket closes; make sure of it
        self._stop()


# -- TAP ----------------------------------------------------------------------------------------
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


class TapBackend:
    """A host TAP interface: every read() is one frame, every write() one frame.

    Opening /dev/net/tun and attaching to (or creating) an interface needs
    root or CAP_NET_ADMIN.  The interface is the host's to configure.
    """

    def __init__(self, ifname: str) -> None:
        if not ifname or len(ifname.encode()) >= IFNAMSIZ or "/" in ifname:
            raise ConfigError(f"invalid TAP interface name {ifname!r}")
        self.name = ifname
        try:
            self.fd: int | None = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"cannot open /dev/net/tun: {e.strerror}") from None
        try:
            ifr = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(self.fd)
            self.fd = None
            hint = " (needs root or CAP_NET_ADMIN)" if e.errno in (errno.EPERM, errno.EACCES) else ""
            raise ConfigError(f"cannot attach to TAP interface {ifname}: {e.strerror}{hint}") from None
        self.link_up = True
        self.stats = {"rx_frames": 0, "tx_frames": 0, "tx_dropped": 0}

    def send(self, frame: bytes) -> bool:
        if self.fd is None:
            self.stats["tx_dropped"] += 1
            return True
        try:
            os.write(self.fd, frame)
            self.stats["tx_frames"] += 1
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            # e.g. EIO while the host interface is down: the frame is lost, as on a wire
            log.debug("tap %s: write failed: %s", self.name, e.strerror)
            self.stats["tx_dropped"] += 1
        return True

    def flush(self) -> None:
        """Nothing waits: every send() is one write()."""

    def recv(self, limit: int) -> list[bytes]:
        frames: list[bytes] = []
        while self.fd is not None and len(frames) < limit:
            try:
                frame = os.read(self.fd, MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("tap %s: read failed: %s", self.name, e.strerror)
                break
            if not frame:
                break
            if len(frame) <= MAX_FRAME:
                frames.append(frame)
                self.stats["rx_frames"] += 1
        return frames

    def fileno(self) -> int | None:
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None
        self.link_up = False
