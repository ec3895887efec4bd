"""Where pyvirtd keeps its state, and how a process is recognised again after a restart.

    <state>/pyvirtd.sock    the REST API (Unix socket, mode 0600)
    <state>/pyvirtd.lock    held (flock) by the running daemon: one daemon per state directory
    <state>/pyvirtd.log     the daemon's own messages (when started in the background)
    <state>/pyvirtd.db      SQLite: VM definitions and their runtime state
    <state>/vms/<id>/       one directory per VM (see VmPaths)

The state directory is --state-dir, else $PYVIRT_STATE_DIR, else
~/.local/state/pyvirt; it is made with mode 0700.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pyvirt.errors import ConfigError
from pyvirt.fsutil import private_dir

SOCKET_PATH_MAX = 107            # sun_path holds 108 bytes with the terminating NUL


def state_dir(explicit: str | os.PathLike[str] | None = None, create: bool = True) -> Path:
    """The state directory (made 0700 when `create`)."""
    if explicit:
        d = Path(explicit)
    elif os.environ.get("PYVIRT_STATE_DIR"):
        d = Path(os.environ["PYVIRT_STATE_DIR"])
    else:
        d = Path.home() / ".local" / "state" / "pyvirt"
    d = d.expanduser().absolute()
    if create:
        private_dir(d, "state directory")
    longest = d / "vms" / ("x" * 12) / "console.sock"
    if len(os.fsencode(longest)) > SOCKET_PATH_MAX:
        raise ConfigError(f"the state directory {d} is too long for Unix socket paths "
                          f"(at most {SOCKET_PATH_MAX - 30} bytes)")
    return d


def api_socket(state: Path) -> Path:
    return state / "pyvirtd.sock"


@dataclass(frozen=True)
class VmPaths:
    dir: Path

    @property
    def config(self) -> Path:        # written by the daemon before it starts the runner
        return self.dir / "config.json"

    @property
    def console_log(self) -> Path:   # everything the serial console printed
        return self.dir / "console.log"

    @property
    def console_sock(self) -> Path:  # attach to the serial console (one client at a time)
        return self.dir / "console.sock"

    @property
    def control_sock(self) -> Path:  # the runner's control protocol (JSON lines)
        return self.dir / "control.sock"

    @property
    def agent_sock(self) -> Path:    # the host side of the guest agent's virtio-console port
        return self.dir / "agent.sock"

    @property
    def vsock_sock(self) -> Path:    # virtio-vsock's host side: the guest agent (docs/agent.md)
        return self.dir / "vsock.sock"

    @property
    def runner_log(self) -> Path:    # the runner's own stderr
        return self.dir / "runner.log"

    @property
    def exit_file(self) -> Path:     # written by the runner when the VM ends: how and why
        return self.dir / "exit.json"


def vm_paths(state: Path, vm_id: str) -> VmPaths:
    return VmPaths(state / "vms" / vm_id)


def proc_start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22), or
    None if there is no such process or it is a zombie; with the PID it names one process for
    good (a PID can be reused, the pair cannot)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()     # after "pid (comm) "
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def proc_cpu_ticks(pid: int) -> int | None:
    """utime + stime of process `pid` in clock ticks (None if gone)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    return int(fields[11]) + int(fields[12])
