"""Private directories and Unix sockets for pyvirt's background processes (network switches,
pyvirtd and its VM runners), where pyvirt's cache directory is, and reading files a user
names (`open_regular`, `read_regular`)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any, BinaryIO

from pyvirt.errors import ConfigError


def cache_root() -> Path:
    """The cache directory: $PYVIRT_CACHE, else $XDG_CACHE_HOME/pyvirt, else ~/.cache/pyvirt."""
    env = os.environ.get("PYVIRT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pyvirt"


class NotRegularFile(OSError):
    """A path named where a file is expected is a FIFO, a device, a socket or a directory."""


class FileTooLarge(OSError):
    """A file is larger than what its reader takes."""


def open_regular(path: str | Path, *, follow: bool = True) -> BinaryIO:
    """`path` opened for reading if it is a regular file, else NotRegularFile (an OSError whose
    strerror says what it is): opened without waiting, so a FIFO's open returns at once
    instead of waiting for a writer, and /dev/zero is never read.  `follow=False`: a symlink
    at the last component is refused too (ELOOP)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise NotRegularFile(errno.EINVAL, kind, str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, limit: int, *, follow: bool = True) -> bytes:
    """The whole of regular file `path` (open_regular), or FileTooLarge past `limit` bytes --
    checked before reading and again while reading, for a file that grows meanwhile."""
    with open_regular(path, follow=follow) as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise FileTooLarge(errno.EFBIG, f"larger than {limit} bytes", str(path))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def private_dir(d: Path, what: str) -> Path:
    """Make directory `d` (and its parents) with mode 0700 if missing; check that it is a
    directory of this user's and that only this user can enter it."""
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(d)
    except OSError as e:
        raise ConfigError(f"cannot make the {what} {d}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ConfigError(f"the {what} {d} is not a directory of this user's")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def remove_stale_socket(path: Path) -> None:
    """Make room for a new listening socket at `path`: nothing there, or a stale socket
    (nobody listens on it), which is removed.  Anything else is a ConfigError: a file that
    is not a socket, or a live socket -- which may be any host service's (a path can come
    from a file someone else made, such as a snapshot), never to be taken over."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        pass  # stale: nobody listens
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"the socket {path} is in use or cannot be checked ({e.strerror})") from None
    else:
        raise ConfigError(f"the socket {path} is in use (something listens on it): not replaced")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def listen_unix(path: Path, backlog: int = 16) -> socket.socket:
    """A non-blocking Unix stream socket listening at `path` (mode 0600 from the start; a
    stale socket file there is replaced, a live one or another file is a ConfigError)."""
    remove_stale_socket(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    except OSError:
        s.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(backlog)
    s.setblocking(False)
    return s


def end_process(proc: subprocess.Popen[Any], grace: float = 2.0) -> None:
    """End a helper process (passt, virtiofsd): SIGTERM, then SIGKILL after `grace` seconds.
    A jailed runner may not signal it (host/jail.py): such helpers also end when their
    socket to the VM closes."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(PermissionError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
