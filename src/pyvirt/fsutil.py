"""Private directories and Unix sockets for pyvirt's background processes (network switches,
pyvirtd and its VM runners)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from pyvirt.errors import ConfigError


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


def listen_unix(path: Path, backlog: int = 16) -> socket.socket:
    """A non-blocking Unix stream socket listening at `path` (mode 0600 from the start; a
    stale socket file there is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
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
