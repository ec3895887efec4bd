"""The container contract inside the VM: what the default kernel boots for `pyvirt run --oci`.

The guest is the default guest's kernel and initramfs with a second cpio archive appended
(the kernel unpacks both) holding

    /pyvirt-oci/init    data/init: mounts the image's disk and the container's file systems
    /pyvirt-oci/exec    data/exec.c, built once with the riscv64 cross compiler (cached as
                        oci-exec-<key>/exec): PID 1, runs the process, reaps, forwards
                        signals, powers off with the process's exit status
    /pyvirt-oci/spec    this run's process: argv, environment, working directory, uid, gid,
                        groups and where its stdio goes (records "K<value>\\0", see exec.c)

and `rdinit=/pyvirt-oci/init` on the kernel command line.  The process's stdio travels as
`pyvirt run --command`'s does (ContainerPipe: guestcmd.CommandPipe's virtio-console ports, and a
port for the signals pyvirt run receives); with -t it is a pseudo-terminal that PID 1 relays to
the serial console (Ctrl-C reaches the process through its line discipline); a pyvirtd VM's
process writes to the console (the VM's log).

What the image config asks (Entrypoint, Cmd, Env, WorkingDir, User) is read with bounds: at
most MAX_ENV environment entries of MAX_ENV_BYTES in all, MAX_ARGS arguments; -e, -w, -u and a
command given override it.  A user name is looked up in the image's /etc/passwd and
/etc/group (kept beside the base disk).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pyvirt.errors import BuildError, ConfigError
from pyvirt.guestcmd import CommandPipe
from pyvirt.images import cache
from pyvirt.images.cpio import CpioWriter
from pyvirt.oci.store import OciError
from pyvirt.spec import PortSpec

MAX_ENV = 1024
MAX_ENV_BYTES = 128 << 10
MAX_ARGS = 1024
MAX_ARG_BYTES = 128 << 10
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CROSS_GCC = "riscv64-linux-gnu-gcc"


def data_file(name: str) -> bytes:
    return resources.files("pyvirt.oci").joinpath(f"data/{name}").read_bytes()


@dataclass
class RunOptions:
    """What the user asked of the container (each None/empty: the image's own)."""

    command: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    stdio: str = "ports"                 # ports | tty | console
    hostname: str = "container"


@dataclass
class Process:
    argv: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    groups: list[int]
    stdio: str

    def spec(self) -> bytes:
        out = bytearray()
        for key, values in (("A", self.argv), ("E", self.env), ("W", [self.cwd]), ("U", [str(self.uid)]),
                            ("G", [str(self.gid)]), ("S", [str(g) for g in self.groups]), ("I", [self.stdio])):
            for v in values:
                out += key.encode() + v.encode("utf-8", "surrogateescape") + b"\0"
        return bytes(out)


def _strings(value: Any, what: str, limit: int, total: int) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OciError(f"the image config's {what} is not a list of strings")
    if len(value) > limit or sum(len(v) for v in value) > total:
        raise OciError(f"the image config's {what} is too large ({len(value)} entries, "
                       f"{sum(len(v) for v in value)} bytes; at most {limit} and {total}), refused")
    if any("\0" in v for v in value):
        raise OciError(f"the image config's {what} holds a NUL byte, refused")
    return value


def process(config: dict[str, Any], opts: RunOptions, passwd: str, group: str) -> Process:
    """The container's main process: the image config's, overridden by `opts`."""
    c = config.get("config") or {}
    if not isinstance(c, dict):
        raise OciError("the image config's config is not an object")
    entry = _strings(c.get("Entrypoint"), "Entrypoint", MAX_ARGS, MAX_ARG_BYTES)
    cmd = _strings(c.get("Cmd"), "Cmd", MAX_ARGS, MAX_ARG_BYTES)
    argv = entry + (opts.command or cmd)
    if not argv:
        raise ConfigError("the image names no command (no Entrypoint or Cmd): give one after the image")
    if len(argv) > MAX_ARGS or sum(len(a) for a in argv) > MAX_ARG_BYTES:
        raise ConfigError(f"the command is too long (at most {MAX_ARGS} words, {MAX_ARG_BYTES} bytes)")
    env = _strings(c.get("Env"), "Env", MAX_ENV, MAX_ENV_BYTES)
    workdir = opts.workdir or c.get("WorkingDir") or "/"
    if not isinstance(workdir, str) or not workdir.startswith("/") or "\0" in workdir:
        raise ConfigError(f"-w {str(workdir)[:80]}: the working directory must be an absolute path")
    user = opts.user if opts.user is not None else c.get("User") or ""
    if not isinstance(user, str):
        raise OciError("the image config's User is not a string")
    uid, gid, groups, home = user_ids(user, passwd, group)
    values: dict[str, str] = {}
    for e in env:
        k, _, v = e.partition("=")
        values[k] = v
    values.setdefault("PATH", DEFAULT_PATH)
    values["HOSTNAME"] = opts.hostname
    values.setdefault("HOME", home)
    if opts.stdio == "tty":
        values.setdefault("TERM", "xterm")
    for e in opts.env:
        k, sep, v = e.partition("=")
        if not k or "\0" in e:
            raise ConfigError(f"-e {e[:80]}: expected KEY=VALUE")
        if not sep:
            if k not in os.environ:
                continue
            v = os.environ[k]
        values[k] = v
    env_out = [f"{k}={v}" for k, v in values.items()]
    if len(env_out) > MAX_ENV or sum(len(e) for e in env_out) > MAX_ENV_BYTES:
        raise ConfigError(f"the environment is too large (at most {MAX_ENV} entries, {MAX_ENV_BYTES} bytes)")
    return Process(argv, env_out, workdir, uid, gid, groups, opts.stdio)


def _table(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines()[:65536] if line and not line.startswith("#")]


def _id(text: str) -> int | None:
    """A user or group id as /etc/passwd, /etc/group or -u write it: ASCII digits, 32 bits
    (str.isdigit() also takes "²", which int() refuses); None if it is not one."""
    if not (text.isascii() and text.isdigit() and len(text) <= 10) or int(text) >= 1 << 32:
        return None
    return int(text)


def user_ids(user: str, passwd: str, group: str) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary gids, home) of USER[:GROUP] (names or numbers) in the image."""
    name, _, grp = user.partition(":")
    users = _table(passwd)
    groups = _table(group)
    uid, gid, home, uname = 0, 0, "/", ""
    if name:
        row = next((r for r in users if len(r) >= 6 and (r[0] == name or (_id(name) is not None and r[2] == name))),
                   None)
        if row is not None:
            ids = _id(row[2]), _id(row[3])
            if ids[0] is None or ids[1] is None:
                raise OciError(f"the image's /etc/passwd entry for {name[:40]} is malformed")
            uid, gid, home, uname = ids[0], ids[1], row[5] or "/", row[0]
        elif (number := _id(name)) is not None:
            uid, gid = number, number if not grp else 0
        elif name.isdigit():
            raise ConfigError(f"-u {user[:80]}: ids are at most 32 bits")
        else:
            raise ConfigError(f"-u {user}: no user {name!r} in the image's /etc/passwd")
    else:
        home = "/root"
    if grp:
        row = next((r for r in groups if len(r) >= 3 and (r[0] == grp or (_id(grp) is not None and r[2] == grp))), None)
        if row is not None:
            gid = number if (number := _id(row[2])) is not None else gid
        elif (number := _id(grp)) is not None:
            gid = number
        elif grp.isdigit():
            raise ConfigError(f"-u {user[:80]}: ids are at most 32 bits")
        else:
            raise ConfigError(f"-u {user}: no group {grp!r} in the image's /etc/group")
    extra = [g for r in groups if len(r) >= 4 and uname and uname in r[3].split(",") and (g := _id(r[2])) is not None]
    return uid, gid, sorted({gid, *extra})[:256], home


def helper() -> Path:
    """/pyvirt-oci/exec for riscv64, built (once per source) with the cross compiler."""
    source = data_file("exec.c")
    final = cache.cache_root() / f"oci-exec-{cache.key('oci-exec', source)}"
    if (final / "exec").is_file():
        return final / "exec"
    if shutil.which(CROSS_GCC) is None:
        raise BuildError(f"{CROSS_GCC} is needed to build the container init (gcc-riscv64-linux-gnu)")
    with cache.lock(final.name), cache.building(final) as out:
        (out / "exec.c").write_bytes(source)
        p = subprocess.run([CROSS_GCC, "-static", "-Os", "-o", str(out / "exec"), str(out / "exec.c")],
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise BuildError(f"building the container init failed: {p.stderr.strip().splitlines()[-1:]}")
    return final / "exec"


def initrd(base_initrd: Path, proc: Process, out: Path) -> Path:
    """The default initramfs followed by /pyvirt-oci/{init,exec,spec}, written to `out`."""
    w = CpioWriter()
    w.file("pyvirt-oci/init", data_file("init"), 0o755)
    w.file("pyvirt-oci/exec", helper().read_bytes(), 0o755)
    w.file("pyvirt-oci/spec", proc.spec(), 0o644)
    w.directory("oci")
    data = base_initrd.read_bytes()
    data += b"\0" * (-len(data) % 4)
    cache.write_atomic(out, data + w.to_bytes())
    return out


class ContainerPipe(CommandPipe):
    """`pyvirt run --oci`'s ports: the process's stdio as `--command`'s (no command is sent),
    and org.pyvirt.signal, on which each byte is a signal number PID 1 sends to the process."""

    SIGNAL_PORT = "org.pyvirt.signal"

    def __init__(self) -> None:
        super().__init__("")
        self.specs.append(PortSpec(name=self.SIGNAL_PORT, socket=self.dir / "signal.sock"))
        self.signal_sock: Any = None

    def start(self) -> None:
        super().start()
        self.signal_sock = self._connect("signal")

    def send_signal(self, signum: int) -> bool:
        """Send `signum` to the container's process; False when that cannot be done."""
        if self.signal_sock is None or not 1 <= signum < 65:
            return False
        try:
            self.signal_sock.sendall(bytes([signum]))
        except OSError:
            return False
        return True

    def finish(self) -> None:
        if self.signal_sock is not None:
            self.signal_sock.close()
        super().finish()


def append(stdio: str, hostname: str) -> str:
    """The kernel command line of a container VM."""
    return f"console=ttyS0 quiet loglevel=1 rdinit=/pyvirt-oci/init pyvirt.oci={stdio} pyvirt.hostname={hostname}"
