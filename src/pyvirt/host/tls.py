"""TLS for migrations over TCP (docs/migration.md): x509 credentials laid out as QEMU's
tls-creds-x509 reads them, and the relay that carries a migration's TLS session.

A directory given to `pyvirtd --tls-creds DIR` holds ca-cert.pem, server-cert.pem,
server-key.pem, client-cert.pem and client-key.pem.  `Creds` loads them once, at the
daemon's start (a missing or bad file is one line there, not a failed migration later): a
server context that demands a client certificate signed by the CA, and a client context
that verifies the server's certificate against the CA (and its name: the address's host or
an explicit one) and presents the client certificate.  TLS 1.2 at least.

The daemon hands a migration's connected socket to the VM's runner (SCM_RIGHTS: the jailed
runner opens no socket); a TLS session cannot travel that way, and the private key should
not live in the process that runs the guest's devices either.  So the daemon ends TLS
itself and the runner gets one end of a socketpair: `Relay` is one thread per migration
that copies plaintext between that socketpair and the TLS socket, both non-blocking, with
a bounded buffer each way, sleeping in poll() whenever neither side can move; EOF or an
error on either side closes both (its `error` keeps the TLS reason, for the message the
source prints: with TLS 1.3 a client learns that the server refused its certificate only
on its first read, after the handshake it saw succeed).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from pathlib import Path

from pyvirt.errors import ConfigError

FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")
BUFFER = 256 * 1024                   # bytes held each way (plus the kernel's socket buffers)
CHUNK = 64 * 1024
HANDSHAKE_TIMEOUT = 30.0


class TlsError(ConfigError):
    """A one-line reason: bad credentials, a failed handshake."""


class PlaintextPeer(TlsError):
    """The peer's first byte is not a TLS handshake record's: a source without TLS (the
    connection is left open, to tell it so in its own protocol)."""


def reason(e: BaseException) -> str:
    """An ssl/OS error in one line ("certificate verify failed: unable to get local issuer
    certificate", "wrong version number", ...)."""
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason.lower().replace("_", " ")
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class Creds:
    def __init__(self, directory: Path | str) -> None:
        d = Path(directory).expanduser()
        self.dir = d.absolute()
        if not d.is_dir():
            raise TlsError(f"--tls-creds {str(d)[:300]}: not a directory (give one holding {', '.join(FILES)})")
        missing = [f for f in FILES if not (d / f).is_file()]
        if missing:
            raise TlsError(f"--tls-creds {str(d)[:300]}: no {', '.join(missing)} there "
                           f"(a credentials directory holds {', '.join(FILES)})")
        try:
            self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.server.load_cert_chain(d / "server-cert.pem", d / "server-key.pem")
            self.server.load_verify_locations(cafile=d / "ca-cert.pem")
            self.server.verify_mode = ssl.CERT_REQUIRED         # mutual: the source shows its certificate
            self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # (verifies the server and its name)
            self.client.load_cert_chain(d / "client-cert.pem", d / "client-key.pem")
            self.client.load_verify_locations(cafile=d / "ca-cert.pem")
        except (ssl.SSLError, OSError, ValueError) as e:
            raise TlsError(f"--tls-creds {str(d)[:300]}: {reason(e)}") from None
        for ctx in (self.server, self.client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    def accept(self, conn: socket.socket, inner: socket.socket | None = None) -> Relay:
        """The destination's side of a connection it accepted: TLS with the client's
        certificate checked; the relay whose `plain` end carries the migration (or that
        relays to `inner`, a connected socket, instead)."""
        return self._wrap(conn, server_side=True, hostname=None, inner=inner)

    def connect(self, conn: socket.socket, hostname: str, inner: socket.socket | None = None) -> Relay:
        """The source's side: the destination's certificate checked against the CA and
        `hostname`."""
        return self._wrap(conn, server_side=False, hostname=hostname, inner=inner)

    def _wrap(self, conn: socket.socket, server_side: bool, hostname: str | None,
              inner: socket.socket | None) -> Relay:
        conn.settimeout(HANDSHAKE_TIMEOUT)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # Each relayed write is a record of its own: Nagle would hold a small one (the
            # pause's READY and GO) until the previous one's delayed ACK, some 40 ms.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if server_side:
            try:
                first = conn.recv(1, socket.MSG_PEEK)
            except OSError as e:
                conn.close()
                raise TlsError(f"TLS handshake failed: {reason(e)}") from None
            if first and first != b"\x16":
                raise PlaintextPeer("the source does not speak TLS (this endpoint takes TLS only)")
        try:
            if server_side:
                tls = self.server.wrap_socket(conn, server_side=True)
            else:
                tls = self.client.wrap_socket(conn, server_hostname=hostname)
        except (ssl.SSLError, OSError, ValueError) as e:
            conn.close()
            raise TlsError(f"TLS handshake failed: {reason(e)}") from None
        return Relay(tls, inner)


class Relay:
    """Copies plaintext between `plain` (a socketpair end: give it to the runner, or read and
    write it here) and the TLS socket, in its own thread, until either side ends.  With
    `inner` (a connected socket, closed with the relay) it relays to that instead (and
    `plain` is that socket too)."""

    def __init__(self, tls: ssl.SSLSocket, inner: socket.socket | None = None) -> None:
        self.tls = tls
        if inner is None:
            self.plain, self._inner = socket.socketpair()
        else:
            self.plain = self._inner = inner
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="tls-relay", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        except (ssl.SSLError, OSError) as e:
            self.error = reason(e)
        finally:
            for s in (self.tls, self._inner):
                with contextlib.suppress(OSError):
                    s.close()

    def _loop(self) -> None:
        tls, inner = self.tls, self._inner
        tls.setblocking(False)
        inner.setblocking(False)
        down = bytearray()                  # from the TLS peer, for the local end
        up = bytearray()                    # from the local end, for the TLS peer
        tls_eof = inner_eof = False
        poll = select.poll()
        while True:
            want = {tls.fileno(): 0, inner.fileno(): 0}
            ended = (tls_eof, inner_eof)
            moved = 0
            # Read TLS while there is room (its buffered records too: poll() does not see them).
            while not tls_eof and len(down) < BUFFER:
                try:
                    data = tls.recv(min(CHUNK, BUFFER - len(down)))
                except ssl.SSLWantReadError:
                    want[tls.fileno()] |= select.POLLIN
                    break
                except ssl.SSLWantWriteError:
                    want[tls.fileno()] |= select.POLLOUT
                    break
                except ssl.SSLZeroReturnError:
                    data = b""
                if not data:
                    tls_eof = True
                    break
                down += data
                moved += 1
            while down:
                try:
                    n = inner.send(down[:CHUNK])
                except BlockingIOError:
                    want[inner.fileno()] |= select.POLLOUT
                    break
                del down[:n]
                moved += 1
            while not inner_eof and len(up) < BUFFER:
                try:
                    data = inner.recv(min(CHUNK, BUFFER - len(up)))
                except BlockingIOError:
                    want[inner.fileno()] |= select.POLLIN
                    break
                if not data:
                    inner_eof = True
                    break
                up += data
                moved += 1
            while up:
                try:                        # (the same bytes again after a want: OpenSSL asks that)
                    n = tls.send(up[:16384])
                except ssl.SSLWantWriteError:
                    want[tls.fileno()] |= select.POLLOUT
                    break
                except ssl.SSLWantReadError:
                    want[tls.fileno()] |= select.POLLIN
                    break
                del up[:n]
                moved += 1
            # Either side ended: done once what it sent has been passed on.
            if (tls_eof and not down) or (inner_eof and not up):
                if inner_eof:               # close_notify: the peer sees a clean end
                    with contextlib.suppress(ssl.SSLError, OSError):
                        tls.unwrap()
                return
            # Sleep only when nothing moved this round: then every side that could move is
            # waiting on its descriptor (a round that moved may have made room elsewhere).
            if moved or (tls_eof, inner_eof) != ended:
                continue
            for fd, events in want.items():
                if events:
                    poll.register(fd, events)
                else:
                    with contextlib.suppress(KeyError):
                        poll.unregister(fd)
            poll.poll()
