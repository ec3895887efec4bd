"""virtiofsd, the vhost-user back end of a shared host folder, started for one VM.

QEMU's virtiofsd serves one directory (`-o source=`) over the vhost-user socket it is
handed (`--fd`: a listening Unix socket in a private directory; pyvirt connects to it at
once, so no name is ever open to others).  Its own sandbox (`-o sandbox=namespace`, the
default) moves it into new mount, PID and network namespaces and pivot_root(2)s into the
shared directory: whatever a guest asks (`..` from the share's root, a symbolic link to
/etc/shadow, a rename race), the server resolves it inside the share, because nothing
else is in its file system view.  virtiofsd has no read-only option, so `,ro` is enforced
below it: it is started by `unshare --mount` with the directory bind-mounted read-only
over itself in that private mount namespace, and every write the guest asks for fails
with EROFS on the host side (the guest's mount option is only a courtesy).

virtiofsd needs root (its sandbox makes namespaces).  It ends when its socket closes (the
VM ended); `close()` also signals it, where the runner's jail lets it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from pyvirt.backends.vhost_user import VhostUserError, VhostUserFrontEnd
from pyvirt.errors import ConfigError
from pyvirt.fsutil import end_process

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# In the private mount namespace: the directory read-only over itself, then virtiofsd.
_READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def virtiofsd_argv(source: Path, listen_fd: int, read_only: bool, cache: str = "auto",
                   exe: str = VIRTIOFSD) -> list[str]:
    """The command line that serves `source` on the listening socket `listen_fd` (also what
    bench/share.py gives QEMU's side, with a socket path instead)."""
    argv = [exe, f"--fd={listen_fd}", "-o", f"source={source}", "-o", f"cache={cache}",
            "-o", "sandbox=namespace", "-o", "log_level=warn", "-o", "no_posix_lock", "-o", "no_flock"]
    if read_only:
        unshare = shutil.which("unshare") or "unshare"
        argv = [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", _READ_ONLY, "sh",
                str(source), *argv]
    return argv


class Virtiofsd:
    """One virtiofsd process and the vhost-user connection to it (`front`)."""

    def __init__(self, source: Path, tag: str, read_only: bool, exe: str = VIRTIOFSD) -> None:
        source = Path(source)
        if not source.is_dir():
            raise ConfigError(f"--share {source}:{tag}: no such directory")
        if not os.access(exe, os.X_OK):
            raise ConfigError(f"--share: {exe} is not installed (scripts/setup-system.sh installs qemu's "
                              "virtiofsd)")
        if os.geteuid() != 0:
            raise ConfigError(f"--share {source}:{tag}: virtiofsd needs root (its sandbox makes namespaces)")
        self.tag = tag
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="pyvirt-virtiofsd-"))
        self.front: VhostUserFrontEnd | None = None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            path = str(self.dir / "vhost-user.sock")
            listener.bind(path)
            listener.listen(1)
            logfile = self.dir / "virtiofsd.log"
            with open(logfile, "wb") as err:
                self.proc = subprocess.Popen(
                    virtiofsd_argv(source.resolve(), listener.fileno(), read_only, exe=exe),
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, pass_fds=[listener.fileno()],
                    start_new_session=True)
            try:
                self.front = VhostUserFrontEnd.connect(path, name=f"virtiofsd ({tag})")
                self.front.handshake()
            except VhostUserError as e:
                why = self._log_tail(logfile) or str(e)
                raise ConfigError(f"--share {source}:{tag}: virtiofsd did not start: {why}") from None
        except BaseException:
            listener.close()
            self.close()
            raise
        listener.close()

    @staticmethod
    def _log_tail(logfile: Path) -> str:
        try:
            lines = logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def close(self) -> None:
        if self.front is not None:
            self.front.close()            # virtiofsd ends when its socket closes
            self.front = None
        if self.proc is not None:
            end_process(self.proc, grace=3.0)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
