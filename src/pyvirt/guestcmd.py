"""The default guest's command contract, shared by `pyvirt run --command` and pyvirtd.

Two roads to its /init (src/pyvirt/images/data/init):

* `command_append`: the command travels base64-encoded on the kernel command line
  (pyvirt.cmd=...), which holds about 675 bytes of command; its output goes to the console,
  stdin is /dev/null (pyvirtd's VMs, --snapshot-after, guests of your own).
* `CommandPipe` (pyvirt.cmdport=1): `pyvirt run --command` on the default guest.  Four
  virtio-console ports on Unix sockets in a private temporary directory carry the command
  (org.pyvirt.command, closed after it: any length), the command's stdin (this process's
  stdin, until its end) and its stdout and stderr (to this process's, kept apart).  Threads
  of this process are the host side of the sockets.

The guest agent answers on the virtio-console port named AGENT_PORT (images/data/init).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from pyvirt.errors import ConfigError
from pyvirt.spec import PortSpec

MAX_COMMAND_B64 = 900     # the riscv kernel command line holds 1024 bytes
AGENT_PORT = "org.pyvirt.agent"   # the port pyvirtd's runner adds to every VM for the guest agent
PORTS = ("command", "stdin", "stdout", "stderr")      # org.pyvirt.<name>
CONNECT_TIMEOUT = 10.0
DRAIN_TIMEOUT = 10.0      # seconds to wait, after the VM ended, for the last output


def _quiet(append: str | None) -> list[str]:
    # Keep the console to the command's own output -- and a kernel panic's message
    # (KERN_EMERG, shown with loglevel=1), which `pyvirt run` reports (vmm/watchdog.py).
    return [a for a in (append or "").split() if not a.startswith("earlycon")] + ["quiet", "loglevel=1"]


def command_append(append: str | None, command: str, what: str = "--command") -> str:
    """The kernel command line `append` extended to run `command` (and print only its output)."""
    encoded = base64.b64encode(command.encode()).decode()
    if len(encoded) > MAX_COMMAND_B64:
        raise ConfigError(f"{what} is too long ({len(command.encode())} bytes; the kernel "
                          f"command line allows about {MAX_COMMAND_B64 * 3 // 4})")
    return " ".join(_quiet(append) + [f"pyvirt.cmd={encoded}"])


def command_ports_append(append: str | None) -> str:
    """The kernel command line `append` extended to take the command from the ports."""
    return " ".join(_quiet(append) + ["pyvirt.cmdport=1"])


class CommandPipe:
    """The host side of `--command`'s ports: `specs` go into the VM's ports; `start()` once the
    VM listens on them; `finish()` after the VM is closed (it waits for the last output)."""

    def __init__(self, command: str, stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2) -> None:
        self.command = command.encode()
        self.fds = {"stdin": stdin_fd, "stdout": stdout_fd, "stderr": stderr_fd}
        self.dir = Path(tempfile.mkdtemp(prefix="pyvirt-cmd-"))
        self.specs = [PortSpec(name=f"org.pyvirt.{n}", socket=self.dir / f"{n}.sock") for n in PORTS]
        self.outputs: list[threading.Thread] = []
        self.broken = False                  # stdout or stderr was closed on the host (| head)
        self.on_broken: Callable[[], None] | None = None     # e.g. the VM's request_quit

    def _connect(self, name: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(CONNECT_TIMEOUT)
        s.connect(str(self.dir / f"{name}.sock"))
        s.settimeout(None)
        return s

    def start(self) -> None:
        socks = {n: self._connect(n) for n in PORTS}
        socks["command"].sendall(self.command)
        socks["command"].close()                     # the guest reads the command up to its end
        threading.Thread(target=self._input, args=(socks["stdin"],), daemon=True).start()
        for n in ("stdout", "stderr"):
            t = threading.Thread(target=self._output, args=(socks[n], self.fds[n]), daemon=True)
            t.start()
            self.outputs.append(t)

    def _input(self, s: socket.socket) -> None:
        try:
            while data := os.read(self.fds["stdin"], 65536):
                s.sendall(data)
        except OSError:
            pass
        finally:
            s.close()                                # the command reads end-of-file

    def _output(self, s: socket.socket, fd: int) -> None:
        try:
            while data := s.recv(65536):
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(fd, view):]
                    except OSError:          # nobody reads it any more: end the VM, as a pipe would
                        self.broken = True
                        if self.on_broken is not None:
                            self.on_broken()
                        return
        except OSError:
            pass
        finally:
            s.close()

    def finish(self) -> None:
        for t in self.outputs:
            t.join(DRAIN_TIMEOUT)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)
