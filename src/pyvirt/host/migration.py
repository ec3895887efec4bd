"""Live and cold migration between pyvirtd daemons (docs/migration.md).

The destination daemon first opens an *incoming endpoint* for a VM name (`open_incoming`:
POST /migrations/incoming, `pyvirt incoming NAME`): a Unix socket in its state directory or
a TCP port, and a one-time token.  One connection is accepted; the daemon checks the
greeting and the spec itself (vmm/migration.py's `accept_handshake`, with `trusted_spec`
below: nothing the source says reaches a host file the destination's user did not name),
records the VM and starts its runner with the connection, which receives the rest
(`runner_receive`) before it builds its jail.  A runner that fails or dies before the VM is
complete leaves nothing: its record and directory are removed (`incoming_failed`).

The source daemon (`migrate`: POST /vms/{name}/migrate, `pyvirt migrate VM --to ADDRESS`)
connects to the address and hands the connected socket to the VM's runner over its control
socket (SCM_RIGHTS: a jailed runner opens no socket), which migrates between slices
(`runner_migrate`).  When it completed, the source runner ends and its record says where
the VM went (state "migrated"); otherwise the VM runs on, unchanged.

A stopped (or crashed) VM moves *cold* through the same command: its definition travels
(the greeting says "cold"), its disks shared or copied (--copy-storage-all: the daemons
themselves read and write them), and it arrives stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvirt.errors import ConfigError, ImageError
from pyvirt.fsutil import listen_unix
from pyvirt.guestcmd import AGENT_PORT
from pyvirt.host import control
from pyvirt.host.errors import Conflict, Invalid
from pyvirt.host.paths import VmPaths
from pyvirt.host.store import DuplicateName, VmRecord
from pyvirt.host.tls import Creds, PlaintextPeer, Relay, TlsError
from pyvirt.spec import VmSpec
from pyvirt.vmm import migration as proto

if TYPE_CHECKING:
    from pyvirt.host.manager import Manager
    from pyvirt.host.supervisor import Supervisor

log = logging.getLogger("pyvirtd")
INCOMING_TIMEOUT = 600.0        # an endpoint nobody connected to closes after this
MAX_INCOMING = 16               # endpoints open at once
MARK = "incoming"               # in the VM directory while the VM is still arriving
GUEST_FIELDS = ("cpus", "memory", "append", "rng", "engine", "mmu")


def parse_address(to: str, flag: str = "--to") -> tuple[int, Any]:
    """unix:/PATH or /PATH -> a Unix socket; tcp:HOST:PORT or HOST:PORT -> TCP (port 0: any)."""
    if to.startswith("unix:") or to.startswith("/"):
        return socket.AF_UNIX, to.removeprefix("unix:")
    host, sep, port = to.removeprefix("tcp:").rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise Invalid(f"{flag} {to[:300]}: give unix:/PATH or tcp:HOST:PORT")
    return socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"), int(port))


def connect(to: str, timeout: float = 10.0, tls: Creds | None = None,
            tls_hostname: str | None = None) -> tuple[socket.socket, Relay | None]:
    """A connection to the destination `to`; over TCP with `tls` (the daemon's --tls-creds),
    TLS with the destination's certificate checked against the CA and `tls_hostname` (default:
    the address's host), carried by a Relay: then the socket is its plaintext end."""
    family, addr = parse_address(to)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except (OSError, ValueError, TypeError) as e:
        s.close()
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise Conflict(f"cannot reach the destination {to[:300]}: {why}") from None
    if tls is None or family == socket.AF_UNIX:
        return s, None
    try:
        relay = tls.connect(s, tls_hostname or addr[0])
    except TlsError as e:
        raise Conflict(f"the destination {to[:300]}: {e}") from None
    return relay.plain, relay


def _tls_why(why: str, relay: Relay | None) -> str:
    """A failed migration's reason, with what TLS said when the relay ended on an error (a
    destination refusing the source's certificate says so only after the handshake)."""
    if relay is None or not relay.error:
        return why
    hint = ": the destination refused this daemon's client certificate" if "alert" in relay.error else ""
    return f"{why} (TLS: {relay.error}{hint})"


def _boot_file_ok(path: Any, allowed: list[Path]) -> bool:
    from pyvirt.images.cache import cache_root
    if path is None:
        return True
    p = Path(str(path)).resolve()
    roots = [cache_root().resolve()]
    return p.is_file() and (any(p.is_relative_to(r) for r in roots) or p in allowed)


def _list(spec: dict[str, Any], key: str) -> list[Any]:
    """The source's `key` list (none: empty); anything else is refused here, before it is read."""
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"its {key} is not a list")
    return value


def trusted_spec(spec: Any, vm_dir: Path, allow: list[Path], copies: list[proto.DiskCopy] | None = None) -> VmSpec:
    """The spec an incoming VM gets: the guest's hardware as sent; boot files only from the
    image cache (or `allow`); disks only at paths in `allow` (shared storage), or -- when the
    source copies them (`copies`) -- new images in the VM's own directory; NICs only on
    the user network (passt, made afresh: connections are lost) or a `pyvirt network` of this
    host (its MAC kept); console ports only the guest agent's and the vsock device's socket, in
    its own directory; no shared folders."""
    if not isinstance(spec, dict):
        raise ConfigError("the spec is not an object")
    out: dict[str, Any] = {k: spec[k] for k in GUEST_FIELDS if k in spec}
    for f in ("kernel", "initrd", "bios"):
        if not _boot_file_ok(spec.get(f), allow):
            raise ConfigError(f"its {f} {str(spec.get(f))[:200]} is not a boot file of this host's image cache")
        out[f] = spec.get(f)
    disks = _list(spec, "disks")
    if copies:
        disks = proto.copy_targets(disks, copies, vm_dir)
    for d in [] if copies else disks:
        path = Path(str(d.get("path") if isinstance(d, dict) else "")).resolve()
        if path not in allow:
            raise ConfigError(f"its disk {str(path)[:200]} is not shared with this host (allow it on the "
                              "incoming endpoint, or migrate with --copy-storage-all)")
    out["disks"] = disks
    nets = []
    for n in _list(spec, "nets"):
        if not isinstance(n, dict) or n.get("backend") not in ("user", "network"):
            raise ConfigError("only user-network and `pyvirt network` NICs can move")
        nets.append({k: n[k] for k in ("backend", "network", "mac", "tx_bw", "rx_bw") if k in n})
    out["nets"] = nets
    ports = [p for p in _list(spec, "ports") if isinstance(p, dict)]
    if any(p.get("name") != AGENT_PORT for p in ports):
        raise ConfigError("console ports other than the guest agent's cannot move")
    out["ports"] = [{"name": AGENT_PORT, "socket": str(vm_dir / "agent.sock")}] if ports else []
    if spec.get("shares"):
        raise ConfigError("a VM with a shared folder cannot move (its virtiofsd's state stays here)")
    vsock = spec.get("vsock")
    if vsock is not None:                   # (its socket: the guest agent's, in its own directory)
        cid = vsock.get("cid", 3) if isinstance(vsock, dict) else None
        out["vsock"] = {"cid": cid, "socket": str(vm_dir / "vsock.sock")}
    return VmSpec.model_validate(out)


def _incoming(runners: Supervisor) -> dict[str, dict[str, Any]]:
    """The daemon's incoming endpoints by VM name (kept by its runners' supervisor, whose
    `_ended` reads them); one whose runner has the VM complete (its directory lost the mark)
    is "arrived"."""
    table = runners.migrations_incoming
    for info in table.values():
        if info["state"] == "receiving" and not (paths_of(runners.state, info["vm_id"]).dir / MARK).exists():
            info["state"] = "arrived" if runners.store.get(info["vm_id"]) is not None else "failed"
    return table



def open_incoming(m: Manager, name: str, tcp: str | None = None,
                  allow: list[str] | None = None) -> dict[str, Any]:
    from pyvirt.host.models import NAME_RE, NAME_RULE
    if not re.fullmatch(NAME_RE, name):
        raise Invalid(f"VM name {name[:80]!r}: {NAME_RULE}")
    try:
        allowed = [Path(a).resolve() for a in allow or []]
    except (OSError, ValueError) as e:
        raise Invalid(f"--allow: {e}") from None
    with m.lock:
        table = _incoming(m.runners)
        if m.store.get(name) is not None or table.get(name, {}).get("state") in ("waiting", "receiving"):
            raise Conflict(f"a VM named {name} exists already")
        for old in [n for n, i in table.items() if i["state"] not in ("waiting", "receiving")]:
            del table[old]
        if len(table) >= MAX_INCOMING:
            raise Conflict(f"{MAX_INCOMING} incoming migrations are open already")
        token = secrets.token_hex(24)       # (hex: never a leading "-" that a shell argument parser would take for a flag)
        if tcp:
            family, (host, port) = parse_address(f"tcp:{tcp}", "--tcp")
            try:
                listener = socket.create_server((host, port), family=family)
            except (OSError, ValueError, TypeError, UnicodeError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise Invalid(f"--tcp {tcp[:300]}: {why}") from None
            address = f"tcp:{f'[{host}]' if ':' in host else host}:{listener.getsockname()[1]}"
            path = None
        else:
            (m.state / "incoming").mkdir(mode=0o700, exist_ok=True)
            path = m.state / "incoming" / f"{name}.sock"
            listener = listen_unix(path)
            listener.setblocking(True)
            address = f"unix:{path}"
        tls = m.tls is not None and path is None
        _incoming(m.runners)[name] = {"address": address, "tls": tls, "state": "waiting", "error": None}
    threading.Thread(target=_serve_incoming, args=(m, name, listener, path, token, allowed),
                     name=f"incoming-{name}", daemon=True).start()
    log.info("incoming migration for VM %s on %s%s", name, address, " (TLS)" if tls else "")
    return {"name": name, "address": address, "token": token, "tls": tls, "expires_in": INCOMING_TIMEOUT}

def incoming_status(m: Manager, name: str) -> dict[str, Any]:
    info = _incoming(m.runners).get(name)
    if info is None:
        raise Invalid(f"no incoming migration for {name}")
    return {"name": name, **info}

def _serve_incoming(m: Manager, name: str, listener: socket.socket, path: Path | None, token: str,
                    allow: list[Path]) -> None:
    info = _incoming(m.runners)[name]
    listener.settimeout(INCOMING_TIMEOUT)
    try:
        conn, _ = listener.accept()                # one connection: the token is used up
    except OSError:
        info.update(state="expired", error="nobody connected")
        return
    finally:
        listener.close()
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
    if m.tls is not None and path is None:          # TCP with --tls-creds: TLS, the client's certificate checked
        try:
            conn = m.tls.accept(conn).plain
        except TlsError as e:
            info.update(state="failed", error=str(e))
            log.warning("incoming migration for %s failed: %s", name, e)
            if isinstance(e, PlaintextPeer):
                _refuse_plaintext(conn)
            return
    vm_id = uuid.uuid4().hex[:12]
    rec = None
    try:
        vm_dir = paths_of(m.state, vm_id).dir
        greeting: dict[str, Any] = {}
        spec = proto.accept_handshake(conn, token, lambda s, c: trusted_spec(s, vm_dir, allow, c),
                                      greeting=greeting)
        if greeting["cold"]:                           # a stopped VM: its definition, recorded stopped
            if greeting["disks"]:                      # (and its disks, copied into its directory)
                vm_dir.mkdir(mode=0o700, parents=True)
                try:
                    proto.receive_cold(conn, spec, greeting["disks"])
                except BaseException:
                    shutil.rmtree(vm_dir, ignore_errors=True)
                    raise
            else:
                proto.receive_cold(conn)
            from pyvirt.host.models import VMM_OVERHEAD, Limits
            with m.lock:
                m.store.add(VmRecord(id=vm_id, name=name, spec=spec.model_dump_json(), desired="stopped",
                                     limits=Limits(memory_limit=spec.memory + VMM_OVERHEAD).model_dump_json(),
                                     created=time.time(), origin="migration"))
            info.update(state="arrived", vm_id=vm_id)
            log.info("VM %s arrived stopped (cold migration)", name)
            return
        from pyvirt.host.models import VMM_OVERHEAD, Limits
        rec = VmRecord(id=vm_id, name=name, spec=spec.model_dump_json(),
                       limits=Limits(memory_limit=spec.memory + VMM_OVERHEAD).model_dump_json(),
                       desired="running", created=time.time(), origin="migration")
        with m.lock:
            try:
                m.store.add(rec)
            except DuplicateName:
                raise proto.MigrationError(f"a VM named {name} exists already") from None
            vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            (vm_dir / MARK).write_text("")
            disks = [c.as_dict() for c in greeting["disks"]]
            m.runners.spawn(rec, extra={"incoming": {"fd": conn.fileno(), "disks": disks}},
                            pass_fds=(conn.fileno(),))
        info.update(state="receiving", vm_id=vm_id)
    except (proto.MigrationError, OSError) as e:
        info.update(state="failed", error=str(e))
        log.warning("incoming migration for %s failed: %s", name, e)
        if rec is not None:
            with m.lock:
                m.store.delete(rec.id)
            shutil.rmtree(paths_of(m.state, vm_id).dir, ignore_errors=True)
    finally:
        conn.close()

def _refuse_plaintext(conn: socket.socket) -> None:
    """A source without TLS at a TLS endpoint: say so in the migration protocol (an error
    frame, which it prints) and close once it has read it (a little of its stream read and
    dropped meanwhile: closing with unread bytes would reset the connection under the frame)."""
    try:
        proto.send_frame(conn, proto.ERROR, b"this endpoint takes TLS only (its pyvirtd has --tls-creds): "
                                            b"give the source's pyvirtd --tls-creds too")
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(5)
        for _ in range(64):                    # at most 4 MiB, 5 s a read
            if not conn.recv(65536):
                break
    except OSError:
        pass
    finally:
        conn.close()

def paths_of(state: Path, vm_id: str) -> VmPaths:
    from pyvirt.host.paths import vm_paths
    return vm_paths(state, vm_id)

def incoming_failed(runners: Supervisor, rec: VmRecord) -> bool:
    """A runner that ended before its incoming VM was complete: remove every trace (call
    with the lock held: the supervisor's `_ended` does); whether it was one."""
    vm_dir = runners.paths(rec).dir
    if not (vm_dir / MARK).exists():
        return False
    runners.children.pop(rec.id, None)
    runners._release(rec)
    runners.store.delete(rec.id)
    shutil.rmtree(vm_dir, ignore_errors=True)
    info = _incoming(runners).get(rec.name)
    if info is not None:
        info.update(state="failed", error=info.get("error") or "the runner ended before the VM arrived")
    log.warning("incoming migration for %s failed: nothing kept", rec.name)
    return True

def migrate(m: Manager, name: str, to: str, token: str, downtime: float = proto.DEFAULT_DOWNTIME,
            timeout: float = proto.DEFAULT_TIMEOUT, on_timeout: str = "cancel",
            copy_storage: bool = False, tls_hostname: str | None = None) -> dict[str, Any]:
    """Move the running VM `name` to the daemon listening at `to`; returns its record (state
    migrated) or raises Conflict with why (the VM runs on).  `copy_storage`: its disks are
    copied into the destination's VM directory (libvirt's --copy-storage-all), else shared.
    Over TCP with the daemon's --tls-creds: TLS, the destination's certificate checked for
    `tls_hostname` (default: the address's host)."""
    if on_timeout not in ("cancel", "force"):
        raise Invalid("--on-timeout is cancel or force")
    if not 0 < downtime <= 60 or not 0 < timeout <= 86400:
        raise Invalid("--downtime is 0-60 s and --timeout up to a day")
    if tls_hostname and (m.tls is None or parse_address(to)[0] == socket.AF_UNIX):
        raise Invalid("--tls-hostname: only for a TCP address, from a pyvirtd with --tls-creds")
    rec = m.runners.current(name)
    if rec.state in ("stopped", "crashed"):
        return _migrate_cold(m, rec, to, token, copy_storage, tls_hostname)
    rec = m.runners.running(name)
    sock, relay = connect(to, tls=m.tls, tls_hostname=tls_hostname)
    try:
        req = control.Migrate(token=token, downtime=downtime, timeout=timeout,
                              on_timeout="force" if on_timeout == "force" else "cancel", to=to,
                              copy_storage=copy_storage)
        try:
            m.runners.call(rec, req, control.Done, fds=[sock.fileno()])
        except Conflict as e:
            if relay is not None:
                sock.close()
                relay.join(2)                   # (its reason, when TLS ended it)
            raise Conflict(_tls_why(str(e), relay)) from None
    finally:
        sock.close()
    deadline = time.monotonic() + timeout + 120
    while time.monotonic() < deadline:
        now = m.runners.current(rec.id)
        if not now.alive:
            if now.state == "migrated":
                log.info("VM %s migrated to %s", name, to)
                return m.inspect(rec.id)
            raise Conflict(_tls_why(f"VM {name} ended during the migration: {now.reason}", relay))
        st = m.runners.status(now)
        mig = st.migration if st is not None else None
        if mig is not None and mig.outcome in ("failed", "cancelled"):
            raise Conflict(_tls_why(f"migration of {name} {mig.outcome}: {mig.error}", relay) + "; it runs on here")
        time.sleep(0.1)
    raise Conflict(f"migration of {name}: no outcome in time")


def _migrate_cold(m: Manager, rec: VmRecord, to: str, token: str, copy_storage: bool = False,
                  tls_hostname: str | None = None) -> dict[str, Any]:
    """A stopped VM: its definition moves (its disks shared, or copied with `copy_storage`:
    opened read-only here, which also keeps it from starting meanwhile), it arrives stopped."""
    from pyvirt.backends.disk import open_disk
    spec = rec.spec_dict
    spec["ports"] = [p for p in spec.get("ports", []) if p.get("name") == AGENT_PORT]
    disks: list[Any] = []
    sock = relay = None
    try:
        if copy_storage:
            for d in VmSpec.model_validate(rec.spec_dict).disks:
                disks.append(open_disk(d.path, read_only=True, fmt=d.format))
        sock, relay = connect(to, tls=m.tls, tls_hostname=tls_hostname)
        proto.send_cold(sock, token, spec, disks)
    except (proto.MigrationError, ImageError) as e:
        if relay is not None and sock is not None:
            sock.close()
            relay.join(2)                       # (its reason, when TLS ended it)
        raise Conflict(_tls_why(f"migration of {rec.name}: {e}", relay)) from None
    finally:
        for d in disks:
            d.close()
        if sock is not None:
            sock.close()
    with m.lock:
        m.store.update(rec.id, state="migrated", reason=f"migrated to {to} (stopped)")
    log.info("VM %s (stopped) migrated to %s", rec.name, to)
    return m.inspect(rec.id)


# -- the runner's side ---------------------------------------------------------------------------
def runner_receive(config: dict[str, Any], console: Any, vm_dir: Path) -> Any:
    """An incoming VM's runner: the rest of the stream on the descriptor the daemon passed."""
    sock = socket.socket(fileno=int(config["incoming"]["fd"]))
    try:
        copies = proto.parse_disk_copies(config["incoming"].get("disks"))
        vm = proto.receive_machine(sock, VmSpec.model_validate(config["spec"]), console, copies=copies)
    finally:
        sock.close()
    (vm_dir / MARK).unlink()
    proto.announce(vm)
    return vm


def runner_migrate(runner: Any, req: control.Migrate) -> control.Done:
    """The control request Migrate, with the connected socket in req.fds (the control
    server checked there is one); control.Refused when it cannot start."""
    fds = req.fds
    if len(fds) != 1:
        raise control.Refused("migrate needs one connected socket passed along")
    if getattr(runner, "migration", None) is not None and not runner.migration.done:
        raise control.Refused("a migration is under way")
    sock = socket.socket(fileno=fds[0])
    fds[0] = -1                                    # ours now (the Migration closes it)

    def finished(stats: proto.MigrationStats) -> None:
        if stats.outcome == "completed":
            runner.reason = "migrated"
            runner.migrated_to = req.to[:300]
    try:
        m = proto.Migration(runner.vm, sock, req.token, downtime=req.downtime, timeout=req.timeout,
                            on_timeout=req.on_timeout, copy_storage=req.copy_storage, finished=finished)
    except (proto.MigrationError, ValueError, TypeError) as e:
        sock.close()
        raise control.Refused(str(e)) from None
    runner.migration = m
    m.attach()
    if m.done and m.stats.outcome != "completed":
        raise control.Refused(str(m.stats.error))
    return control.Done()


def migration_status(runner: Any) -> control.MigrationProgress | None:
    m = getattr(runner, "migration", None)
    return None if m is None else control.MigrationProgress.model_validate(json.loads(json.dumps(m.stats.as_dict())))
