"""The VM runner: one OS process per VM, started by pyvirtd.

    python -m pyvirt.host.runner --id ID --state-dir DIR

It reads <vm dir>/config.json (written by the daemon: the VM's name and its
VmSpec), adds the guest agent's virtio-console port (`org.pyvirt.agent` on
<vm dir>/agent.sock), builds the Vm and runs it until the guest powers off or
it is told to stop.  Meanwhile, between slices of the run loop (the Vm's
`watches` hook), it serves:

* the serial console: every byte goes to console.log (rotated to
  console.log.1 beyond 16 MiB) and to the client
  attached to console.sock (one at a time; a second is told the console is
  busy); the attached client's input goes to the guest;
* the control socket control.sock (pyvirt.host.control);
* SIGTERM/SIGINT: the VM ends as with `kill` (disks flushed and closed).

When the VM ends it writes exit.json -- {"reason": "poweroff", "exit_status":
N} when the guest powered off, {"reason": "killed"} when told to end it,
{"reason": "error", "error": MESSAGE} when it could not build the VM, the
guest kernel panicked (vmm/watchdog.py) or the VMM failed -- and exits 0, or 1 after an error.  The daemon reads a runner that died without exit.json
as a crash.

Hooks for snapshots: the control request `Snapshot` calls
`vm.request_snapshot(dir, then=then, done=...)` and replies when it is written; with
"restore": DIR in config.json, `build_vm` builds the VM with
`pyvirt.vmm.restore.load_snapshot(DIR, console, spec=SPEC)` instead of
`Vm(spec, console)`: SPEC is config.json's "spec", the restored spec the daemon
computed for the VM's record (host/snapshots.py); without one, "overrides":
{nets, macs, overlay_dir, engine, ports} are applied to the snapshot's spec.  A snapshot
with then="quit" ends the runner with {"reason": "snapshot", "dir": DIR}.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pyvirt.backends.char import _InputMixin
from pyvirt.errors import ConfigError, PyvirtError
from pyvirt.fsutil import listen_unix
from pyvirt.guestcmd import AGENT_PORT
from pyvirt.host import control
from pyvirt.host.agent import with_vsock
from pyvirt.host.control import DISKS_FILE, ControlServer
from pyvirt.host.migration import migration_status
from pyvirt.host.paths import VmPaths, vm_paths
from pyvirt.spec import NetSpec, PortSpec, VmSpec, format_size
from pyvirt.stream import BufferedStream
from pyvirt.vmm.vm import Vm, Watch

AGENT_BACKLOG = 4096          # bytes of lines waiting for a guest agent that has not opened its port

log = logging.getLogger("pyvirt.runner")
LOG_MAX = 16 << 20        # console.log is rotated (to console.log.1) beyond this
LOG_PENDING = 256 << 10   # console output held before it is written (also within a CPU slice)
BUSY = b"\r\npyvirt: the console is busy (another client is attached)\r\n"


class SocketConsole(_InputMixin):
    """The serial console of a runner: output to a log file and to the attached client (if
    any), input from that client.  Its descriptors are served through a `Watch`."""

    MAX_OUT = 256 * 1024            # a client that reads too slowly loses output, not the VM

    def __init__(self, log: Path, sock: Path) -> None:
        self._handler = None
        self._early = bytearray()
        self.log = log
        self.log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.log_size = os.fstat(self.log_fd).st_size
        self._log = bytearray()
        self.path = sock
        self.server = listen_unix(sock, backlog=2)
        self.client: BufferedStream | None = None

    # -- CharBackend ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        self._log += data
        if len(self._log) >= LOG_PENDING:     # a guest printing (SBI DBCN: 1 MiB a call) within one
            self._write_log()                 # slice: memory and console.log stay bounded
        if self.client is not None and not self.client.full():
            self.client.queue(data)

    def fileno(self) -> int | None:
        return None                  # the Watch wakes the run loop instead

    def poll(self) -> None:
        self.flush()

    def flush(self) -> None:
        self._write_log()
        if self.client is not None and self.client.flush() is not None:
            self._detach()

    def _write_log(self) -> None:
        if self._log:
            with contextlib.suppress(OSError):
                self.log_size += os.write(self.log_fd, self._log[:LOG_MAX])   # (the rest: dropped)
            self._log.clear()
            if self.log_size > LOG_MAX:
                self._rotate()

    def _rotate(self) -> None:
        """console.log -> console.log.1 (replacing the one before), and a new console.log."""
        with contextlib.suppress(OSError):
            os.replace(self.log, self.log.with_name(self.log.name + ".1"))
        os.close(self.log_fd)
        self.log_fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self.log_size = 0

    def close(self) -> None:
        self.flush()
        self._detach()
        self.server.close()
        os.close(self.log_fd)
        with contextlib.suppress(OSError):
            self.path.unlink()

    # -- the attached client -------------------------------------------------------------
    def _detach(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    def fds(self) -> list[int]:
        fd = self.client.fileno() if self.client is not None else None
        return [self.server.fileno()] + ([fd] if fd is not None else [])

    def on_ready(self, ready: list[int]) -> None:
        if self.server.fileno() in ready:
            try:
                conn, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                conn = None
            if conn is not None and self.client is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(BUSY)
                conn.close()
            elif conn is not None:
                self.client = BufferedStream(conn, self.MAX_OUT)
        if self.client is not None and self.client.fileno() in ready:
            data = self.client.recv(4096)
            if data is None or isinstance(data, OSError):
                self._detach()            # detached: the VM goes on
            elif data:
                self._deliver(data)


class Runner:
    def __init__(self, paths: VmPaths, vm: Vm, console: SocketConsole) -> None:
        self.paths = paths
        self.vm = vm
        self.console = console
        self.control = ControlServer(paths.control_sock, self.handle)
        self.agent = self._connect_agent()
        self.agent_out = bytearray()
        self.reason = "poweroff"
        self.last_snapshot: control.SnapshotOutcome | None = None
        self.snapshot_dir: str | None = None
        self.migration: Any = None                 # a vmm.migration.Migration under way or ended
        self.migrated_to: str | None = None
        # A snapshot's new overlays are recorded before the old images are frozen
        # (vmm/snapshot.py's _freeze_disks calls these).
        vm.disks_moved = [lambda: write_disks(self.paths, vm)]    # type: ignore[attr-defined]
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        self.signal_r = rfd
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)       # the wakeup fd carries the signal
        vm.watches += [Watch(console.fds, console.on_ready), Watch(self.control.fds, self.control.on_ready),
                       Watch(lambda: [self.signal_r], self._on_signal),
                       Watch(list, lambda _ready: None, on_tick=self._agent_flush)]

    # -- the guest agent -----------------------------------------------------------------
    def _connect_agent(self) -> socket.socket:
        """Connect to the agent port's socket (the board listens there; a guest reboot resets
        the board in place, the socket and this connection stay)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock = next((p.socket for p in self.vm.spec.ports if p.name == AGENT_PORT), self.paths.agent_sock)
        s.connect(str(sock))
        return s

    def agent_open(self) -> bool:
        """Whether the guest has the agent port open (a line sent now is read)."""
        vcon = self.vm.board.vconsole
        if vcon is None:
            return False
        return any(name == AGENT_PORT and vcon.guest_open[i] for i, name in enumerate(vcon.names))

    def send_agent(self, line: str) -> bool:
        """Queue one line for the guest agent; False (nothing queued) when a line holds a
        control character or AGENT_BACKLOG bytes already wait for an agent that is not there."""
        data = line.encode() + b"\n"
        if not line.isprintable() or len(self.agent_out) + len(data) > AGENT_BACKLOG:
            return False
        self.agent_out += data
        self._agent_flush()
        return True

    def _agent_flush(self) -> None:
        if self.agent_out and self.agent_open():
            # (the guest drops what arrives on a port it has not opened, hence the wait)
            self.agent.sendall(bytes(self.agent_out))
            self.agent_out.clear()

    def _on_signal(self, _ready: list[int]) -> None:
        with contextlib.suppress(OSError):
            os.read(self.signal_r, 64)
        self.reason = "killed"
        self.vm.request_quit()

    # -- the control protocol (host/control.py) --------------------------------------------
    def status(self) -> control.StatusReply:
        return control.StatusReply(state="paused" if self.vm.paused else "running", pid=os.getpid(),
                                   instructions=self.vm.stats.instructions, resets=self.vm.stats.resets,
                                   agent=self.agent_open(), snapshot=self.last_snapshot,
                                   migration=migration_status(self),
                                   console_attached=self.console.client is not None)

    def handle(self, req: control.Request, respond: control.Respond) -> control.Done | None:
        vm = self.vm
        if isinstance(req, control.Status):
            return self.status()
        log.info("%s", req.model_dump_json(exclude={"token"}))    # (a migration's token stays out of the log)
        if isinstance(req, control.Pause):
            if vm.paused:
                raise control.Refused("the VM is already paused")
            vm.pause()
            return control.StateReply(state="paused")
        if isinstance(req, control.Resume):
            if not vm.paused:
                raise control.Refused("the VM is not paused")
            vm.resume()
            return control.StateReply(state="running")
        if isinstance(req, control.Stop):
            vm.resume()
            self.send_agent("poweroff")
            return control.StopReply(agent=self.agent_open())
        if isinstance(req, control.Kill):
            self.reason = "killed"
            vm.request_quit()
            return control.Done()
        if isinstance(req, control.Hostname):
            if not self.send_agent(f"hostname {req.name}"):
                raise control.Refused("the guest agent is not listening and its backlog is full")
            return control.Done()
        if isinstance(req, control.Mac):
            if not self.send_agent(f"mac {req.iface} {req.address}"):
                raise control.Refused("the guest agent is not listening and its backlog is full")
            return control.Done()
        if isinstance(req, control.Snapshot):
            self.snapshot(req, respond)         # (the reply when it is written)
            return None
        if isinstance(req, control.Migrate):
            from pyvirt.host.migration import runner_migrate
            return runner_migrate(self, req)
        raise control.Refused(f"{req.op}: not served by this runner")

    def snapshot(self, req: control.Snapshot, respond: control.Respond) -> None:
        """Ask the Vm for a snapshot at its next slice boundary (at once while paused); the
        reply goes out when it is written (or failed), and `status` shows it as "snapshot".
        then="quit" ends the VM after it."""
        directory, then, live_dir = req.dir, req.then, req.live_dir

        def done(_manifest: Any, error: Exception | None) -> None:
            if live_dir is not None and then == "continue":
                # Before the guest runs again: the daemon records these (supervisor.sync_disks)
                # however long it waited, even if it gave up or was restarted.
                write_disks(self.paths, self.vm)
            self.last_snapshot = control.SnapshotOutcome(dir=directory, then=then, ok=error is None,
                                                         error=None if error is None else str(error))
            if then == "quit" and error is None:
                self.reason = "snapshot"
                self.snapshot_dir = directory
            respond(control.SnapshotReply(snapshot=self.last_snapshot))

        self.last_snapshot = control.SnapshotOutcome(dir=directory, then=then, ok=None)
        # the VM's own images (its directory) are frozen in place, the user's disks copied
        self.vm.request_snapshot(directory, then=then, done=done, live_dir=live_dir, own_dir=self.paths.dir,
                                 shares_unmounted=req.shares_unmounted)
        return None

    def close(self) -> None:
        self.control.close()
        self.agent.close()


def with_agent_port(spec: VmSpec, sock: Path) -> VmSpec:
    """The spec plus the guest agent's port (unless the spec already has one of that name)."""
    if any(p.name == AGENT_PORT for p in spec.ports):
        return spec
    return spec.model_copy(update={"ports": [*spec.ports, PortSpec(name=AGENT_PORT, socket=sock)]})


def build_vm(config: dict[str, Any], paths: VmPaths, console: SocketConsole) -> Vm:
    """The Vm to run: a new one from the spec, or -- with config["restore"] = a snapshot
    directory -- the snapshot's, through pyvirt.vmm.snapshot.load_snapshot where this pyvirt
    has it (config["overrides"] is passed on); with config["incoming"], the VM arriving on the
    connection the daemon passed (host/migration.py)."""
    if config.get("incoming"):
        from pyvirt.host.migration import runner_receive
        return runner_receive(config, console, paths.dir)
    if config.get("restore"):
        try:
            from pyvirt.vmm.restore import Overrides, load_snapshot
        except ImportError:
            raise ConfigError("restoring a snapshot is not supported by this pyvirt") from None
        if config.get("spec") is not None and config.get("overrides") is None:
            # the daemon's record: the restored spec it computed (host/snapshots.py)
            return load_snapshot(config["restore"], console, spec=VmSpec.model_validate(config["spec"]))
        ov = config.get("overrides") or {}
        nets = ov.get("nets")
        overrides = Overrides(nets=None if nets is None else [NetSpec.model_validate(n) for n in nets],
                              macs=ov.get("macs"), overlay_dir=ov.get("overlay_dir"), engine=ov.get("engine"),
                              ports=ov.get("ports"), vsock=paths.vsock_sock)
        return load_snapshot(config["restore"], console, overrides=overrides)
    spec = with_agent_port(VmSpec.model_validate(config["spec"]), paths.agent_sock)
    spec = with_vsock(spec, paths.vsock_sock)
    if config.get("name") and spec.kernel is not None:
        # the default guest's /init takes its host name from here (every boot, restarts included)
        spec = spec.model_copy(update={"append": f"{spec.append or ''} pyvirt.hostname={config['name']}".strip()})
    return Vm(spec, console)


def write_disks(paths: VmPaths, vm: Vm) -> None:
    """<vm dir>/disks.json: the disks `vm` writes now, durably (written and renamed into place,
    fsynced) -- a failure ends the VM before its guest writes anything the daemon does not know."""
    path = paths.dir / DISKS_FILE
    tmp = path.with_name(DISKS_FILE + ".tmp")
    disks = json.loads(vm.spec.model_dump_json())["disks"]
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(disks).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(paths.dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_exit(paths: VmPaths, **info: Any) -> None:
    tmp = paths.exit_file.with_name("exit.json.tmp")
    tmp.write_text(json.dumps({"time": time.time(), **info}) + "\n")
    os.replace(tmp, paths.exit_file)


def enter_jail(config: dict[str, Any], paths: VmPaths, vm: Vm) -> bool:
    """With config["jail"] true: confine this process now that the board is built
    (host/jail.py; a guest reboot resets the board in place, which needs nothing the jail
    forbids: the backends stay open, the kernel is read again).  What took effect goes to
    <vm dir>/jail.json (`pyvirt inspect` shows it).  Whether any layer is on."""
    from pyvirt.host import jail
    if config.get("jail"):
        spec = json.loads(vm.spec.model_dump_json())
        confinement = jail.runner_jail(paths.dir, paths.dir.parent.parent / "snapshots", spec, vm.board)
        report = jail.apply(confinement)
        report["leftovers"] = [str(d) for d in confinement.leftovers]     # (for the daemon to remove)
    else:
        report = jail.disabled("the jail is turned off (pyvirtd --no-jail or PYVIRT_JAIL=off)")
    on = any(layer["on"] for layer in report.values() if isinstance(layer, dict))
    tmp = paths.dir / "jail.json.tmp"
    try:
        tmp.write_text(json.dumps(report) + "\n")
        os.replace(tmp, paths.dir / "jail.json")
    except OSError as e:
        # (a host whose / or state directory a capability-less process cannot walk)
        raise OSError(e.errno, f"the jailed runner cannot write its VM directory {paths.dir} "
                      f"({e.strerror}); pyvirtd --no-jail turns the jail off") from e
    return on


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyvirt.host.runner")
    ap.add_argument("--id", required=True)
    ap.add_argument("--state-dir", required=True)
    args = ap.parse_args(argv)
    paths = vm_paths(Path(args.state_dir), args.id)
    handler = logging.StreamHandler(sys.stderr)      # runner.log
    handler.setFormatter(logging.Formatter("%(asctime)s runner[%(process)d]: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    with contextlib.suppress(FileNotFoundError):
        paths.exit_file.unlink()
    console = None
    config: dict[str, Any] = {}
    try:
        config = json.loads(paths.config.read_text())
        console = SocketConsole(paths.console_log, paths.console_sock)
        log.info("VM %s (id %s): %s", config.get("name"), args.id,
                 f"restoring the snapshot {config['restore']}" if config.get("restore")
                 else "arriving by migration" if config.get("incoming") else "booting")
        vm = build_vm(config, paths, console)
    except Exception as e:          # whatever stops the VM from being built is reported
        why = str(e) if isinstance(e, (PyvirtError, OSError, ValueError)) else f"{type(e).__name__}: {e}"
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
            memory = (config.get("spec") or {}).get("memory", 0)
            why = f"--memory {format_size(memory)}: this host cannot give the VM that much RAM"
        write_exit(paths, reason="error", error=why)
        log.error("the VM could not be built: %s", why)
        if console is not None:
            console.close()
        return 1
    runner = Runner(paths, vm, console)
    from pyvirt.vmm.watchdog import GuestWatch
    watch = GuestWatch(vm, progress=False, firmware=False)     # a guest panic ends it, in one line
    watch.attach()
    jailed = enter_jail(config, paths, vm)
    try:
        code = vm.run(restore_gc=False)
    except Exception as e:          # a VMM fault: the traceback goes to runner.log
        traceback.print_exc()
        write_exit(paths, reason="error", error=f"the VMM failed: {type(e).__name__}: {e}")
        return 1
    finally:
        runner.close()
        vm.close()
        console.close()
    if watch.failure is not None:
        log.error("%s", watch.failure)
        write_exit(paths, reason="error", error=watch.failure)
        return 1
    if runner.reason == "migrated":
        log.info("migrated to %s; ending", runner.migrated_to)
        write_exit(paths, reason="migrated", to=runner.migrated_to)
    elif runner.reason == "snapshot":
        log.info("saved to the snapshot %s; ending", runner.snapshot_dir)
        write_exit(paths, reason="snapshot", dir=runner.snapshot_dir)
    elif vm.reboot_requested and jailed:
        write_exit(paths, reason="reboot")        # the daemon starts a new runner
    elif runner.reason == "killed" or code is None:
        log.info("killed")
        write_exit(paths, reason="killed")
    else:
        log.info("the guest powered off (exit status %s)", code)
        write_exit(paths, reason="poweroff", exit_status=code)
    return 0

if __name__ == "__main__":
    sys.exit(main())
