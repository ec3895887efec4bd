"""The jail a daemon VM's runner enters once its board is built (issue 14, item 2).

`apply(Jail(...))` confines the calling process, layer by layer, each layer
on its own so that a host that forbids one still gets the others:

* ``namespaces`` -- (`enter_namespaces`) a new user namespace, then new
  mount, IPC and network namespaces owned by it: capabilities count only
  inside them, the network has only a loopback that is down (no TCP, no
  abstract Unix socket of the host even where Landlock cannot refuse them),
  no SysV IPC of the host; sockets already open keep working.  No PID
  namespace (a running process cannot enter one).
* ``no_new_privs`` -- PR_SET_NO_NEW_PRIVS: nothing it executes (were exec
  allowed) gains privileges from set-uid bits or file capabilities.
* ``capabilities`` -- every capability dropped from the bounding set, the
  ambient set cleared, and the effective, permitted and inheritable sets
  emptied (capset): the runner stays uid 0 but without CAP_DAC_OVERRIDE,
  CAP_SYS_ADMIN, CAP_NET_ADMIN, ... it is an ordinary owner of root's files,
  which is why the next layer matters.
* ``landlock`` -- (Landlock ABI >= 1) the filesystem view: read and write
  beneath the VM's directory and the snapshot directory, read of the files
  it was built from (images, kernel, initrd) and of the Python and pyvirt
  code it may still import; nothing else can be opened, created, removed,
  renamed or executed.  With ABI >= 4 no TCP port may be bound or
  connected to; with ABI >= 6 no abstract Unix socket outside the jail may
  be connected to and no process outside it signalled.
* ``seccomp`` -- (libseccomp through ctypes) an allow-list of the system
  calls a running VM makes; anything else fails with EPERM.  Not on the
  list: execve/execveat, fork (clone without CLONE_THREAD; clone3 answers
  ENOSYS so that threads fall back to clone), socket, socketpair, connect,
  bind, listen, ptrace, mount, unshare, setns, bpf, capset, setuid & co,
  kernel modules, keyctl, perf_event_open, userfaultfd, process_vm_*, ...
  EPERM rather than KILL_PROCESS: a call the list missed becomes an error
  the VMM reports (the VM ends with a reason in exit.json, its disks closed)
  rather than a dead runner that loses its pending writes; against an
  attacker the two contain the same.

What it does *not* enforce: the runner keeps uid 0 (its user namespace maps
uid 0 to itself, the only mapping a process may write for itself: it
owns root's files as far as the Landlock rules let it reach them, and
without Landlock ABI 6 it may signal other uid-0 processes); a
pathname Unix socket is refused through seccomp (no new socket, no
connect), not by path -- Landlock has no right for connecting to one at
ABI 7; no PID namespace and no new root (Landlock gives the filesystem view);
resources are the cgroup's business (host/cgroups.py).  Inside the jail a
guest reboot is done by the daemon (the runner ends with reason "reboot"
and is started again, host/manager.py), and a passt that dies is not
restarted (no exec): the NIC stays down until the VM is restarted.

    python -m pyvirt.host.jail --selftest --dir DIR [--read FILE] [--socket SOCK] [--tcp PORT]
                               [--abstract NAME]

applies the same jail (rw DIR, read FILE) and then tries what a jailed
runner must not do, printing a JSON report (tests/host/test_jail.py).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import socket
import sys
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYERS = ("namespaces", "no_new_privs", "capabilities", "landlock", "seccomp")

# -- libc ----------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SYS_CAPGET = 125
SYS_CAPSET = 126
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def _prctl(op: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0) -> int:
    r = _libc.prctl(op, a, b, c, d)
    if r < 0:
        raise _err(f"prctl({op})")
    return r


# -- namespaces ----------------------------------------------------------------------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_libc.unshare.argtypes = [ctypes.c_int]


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) < 0:
        raise _err("unshare")


def _ns_id(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return "?"


def enter_namespaces() -> dict[str, Any]:
    """Move this process into new namespaces, each on its own (a host that forbids one still
    gets the others): a user namespace first (its capabilities then count only inside it, and
    it owns the others), then mount, IPC and network namespaces.  The user namespace maps
    uid and gid to themselves (a process can map only its own ids): the runner keeps uid 0
    for the files it reaches.  The network namespace has only a loopback that is down: no
    TCP, no abstract Unix socket of the host, whatever the other layers allow (the sockets
    already open -- console, control, passt, switch -- keep working).  No PID namespace: a
    running process cannot enter one (only its children would), and a jailed runner starts
    none.  Raises OSError when not even the user namespace can be made."""
    uid, gid = os.geteuid(), os.getegid()
    out: dict[str, Any] = {}
    try:
        _unshare(CLONE_NEWUSER)
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        out["user"] = f"on (uid {uid} and gid {gid} map to themselves)"
    except OSError as e:
        out["user"] = f"off: {e.strerror or e}"
    for kind, flag in (("mnt", CLONE_NEWNS), ("ipc", CLONE_NEWIPC), ("net", CLONE_NEWNET)):
        try:
            _unshare(flag)
            out[kind] = f"on ({_ns_id(kind)})"
        except OSError as e:
            out[kind] = f"off: {e.strerror or e}"
    out["pid"] = "off: a running process cannot enter a new PID namespace (a jailed runner starts no process)"
    if not any(v.startswith("on") for v in out.values()):
        raise OSError(errno.EPERM, f"no namespace could be made ({out['user']})")
    return out


# -- capabilities --------------------------------------------------------------------------------
class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capset(effective: int, permitted: int, inheritable: int = 0) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    if _libc.syscall(SYS_CAPSET, ctypes.byref(hdr), ctypes.byref(data)) < 0:
        raise _err("capset")


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


def drop_capabilities() -> None:
    for cap in range(_last_cap() + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and ctypes.get_errno() not in (errno.EINVAL,):
            raise _err(f"dropping capability {cap} from the bounding set")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)   # (absent before 4.3: fine)
    capset(0, 0, 0)


def capabilities_now() -> dict[str, int]:
    """This process's effective, permitted and inheritable sets (capget), and how many
    capabilities are left in its bounding set."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.syscall(SYS_CAPGET, ctypes.byref(hdr), ctypes.byref(data)) < 0:
        raise _err("capget")
    def both(f: str) -> int:
        return int(getattr(data[0], f)) | int(getattr(data[1], f)) << 32
    bounding = sum(_libc.prctl(PR_CAPBSET_READ, c, 0, 0, 0) == 1 for c in range(_last_cap() + 1))
    return {"effective": both("effective"), "permitted": both("permitted"),
            "inheritable": both("inheritable"), "bounding": bounding}


# -- Landlock ------------------------------------------------------------------------------------
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13          # ABI 2
FS_TRUNCATE = 1 << 14       # ABI 3
FS_IOCTL_DEV = 1 << 15      # ABI 5
NET_BIND_TCP = 1 << 0       # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0   # ABI 6
SCOPE_SIGNAL = 1 << 1

FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ = FS_READ_FILE | FS_READ_DIR
RW_TREE = (READ | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG
           | FS_MAKE_SOCK | FS_REFER | FS_TRUNCATE)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


LANDLOCK_RULE_PATH_BENEATH = 1


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none, or disabled)."""
    r = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(r), 0)


def _fs_handled(abi: int) -> int:
    handled = (1 << 13) - 1
    if abi >= 2:
        handled |= FS_REFER
    if abi >= 3:
        handled |= FS_TRUNCATE
    if abi >= 5:
        handled |= FS_IOCTL_DEV
    return handled


def apply_landlock(rw: Iterable[Path], ro: Iterable[Path], abi: int) -> dict[str, Any]:
    handled = _fs_handled(abi)
    attr = _RulesetAttr(handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    fd = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                       ctypes.c_uint32(0))
    if fd < 0:
        raise _err("landlock_create_ruleset")
    allowed: list[str] = []
    try:
        for paths, rights in ((rw, RW_TREE), (ro, READ)):
            for p in paths:
                try:
                    pfd = os.open(p, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue                      # (gone: nothing to allow)
                try:
                    r = rights & handled
                    if not os.path.isdir(p):
                        r &= FILE_RIGHTS
                    rule = _PathBeneath(r, pfd)
                    if _libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                                     ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
                        raise _err(f"landlock_add_rule {p}")
                    allowed.append(f"{'rw' if rights == RW_TREE else 'ro'} {p}")
                finally:
                    os.close(pfd)
        if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) < 0:
            raise _err("landlock_restrict_self")
    finally:
        os.close(fd)
    return {"abi": abi, "tcp": "denied" if abi >= 4 else "not enforced (Landlock ABI < 4)",
            "scoped": "abstract unix sockets, signals" if abi >= 6 else "not enforced (Landlock ABI < 6)",
            "paths": allowed}


# -- seccomp -------------------------------------------------------------------------------------
ALLOWED_SYSCALLS = """
read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 lseek close close_range
dup dup2 dup3 fcntl fstat newfstatat statx lstat stat fstatfs statfs fsync fdatasync
sync_file_range fallocate ftruncate truncate openat open getdents64 readlink readlinkat unlink
unlinkat rename renameat renameat2 mkdir mkdirat rmdir chmod fchmod fchmodat access faccessat
faccessat2 getcwd chdir fchdir utimensat flock copy_file_range sendfile umask
mmap munmap mprotect mremap madvise brk msync mincore membarrier
futex futex_waitv set_robust_list get_robust_list rseq set_tid_address arch_prctl prctl
clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday time
poll ppoll select pselect6 epoll_create epoll_create1 epoll_ctl epoll_wait epoll_pwait
epoll_pwait2 eventfd2 pipe pipe2 ioctl
sendmsg recvmsg sendto recvfrom sendmmsg recvmmsg accept accept4 shutdown getsockopt
setsockopt getsockname getpeername
rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigtimedwait rt_sigsuspend
sigaltstack kill tgkill tkill wait4 waitid
getpid gettid getppid getuid geteuid getgid getegid getresuid getresgid getgroups getrandom
uname sysinfo getrusage times prlimit64 getrlimit sched_yield sched_getaffinity getpriority
exit exit_group restart_syscall capget
""".split()

SCMP_ACT_ALLOW = 0x7FFF0000
CLONE_THREAD = 0x00010000


def SCMP_ACT_ERRNO(e: int) -> int:  # noqa: N802
    return 0x00050000 | (e & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


SCMP_CMP_MASKED_EQ = 7
SCMP_FLTATR_CTL_OPTIMIZE = 8


def _libseccomp() -> ctypes.CDLL:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)     # (find_library would run ldconfig)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_exact_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                                 ctypes.c_uint, ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    return lib


def apply_seccomp(lib: ctypes.CDLL, names: Iterable[str] = ALLOWED_SYSCALLS) -> dict[str, Any]:
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO(errno.EPERM))
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        allowed = []

        def rule(action: int, name: str, *cmps: _ArgCmp) -> bool:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                return False                    # (not a system call on this architecture)
            arr = (_ArgCmp * max(len(cmps), 1))(*cmps)
            r = lib.seccomp_rule_add_exact_array(ctx, action, nr, len(cmps), arr)
            if r < 0:
                raise OSError(-r, f"seccomp_rule_add {name}: {os.strerror(-r)}")
            return True

        lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2)     # a binary tree (ignored where unknown)
        for name in names:
            if rule(SCMP_ACT_ALLOW, name):
                allowed.append(name)
        # threads only (no fork): clone with CLONE_THREAD; clone3's flags are out of reach of a
        # filter, so it answers ENOSYS and glibc falls back to clone
        rule(SCMP_ACT_ALLOW, "clone", _ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
        rule(SCMP_ACT_ERRNO(errno.ENOSYS), "clone3")
        r = lib.seccomp_load(ctx)
        if r < 0:
            raise OSError(-r, f"seccomp_load: {os.strerror(-r)}")
    finally:
        lib.seccomp_release(ctx)
    return {"default": "EPERM", "allowed": len(allowed) + 1}


# -- the whole jail -------------------------------------------------------------------------------
@dataclass
class Jail:
    rw: list[Path] = field(default_factory=list)      # read, write, create, remove beneath
    ro: list[Path] = field(default_factory=list)      # read (directories: beneath)
    # directories the jailed process empties but may not remove (its passts' private
    # directories in /tmp: removing one needs a right on /tmp): the daemon removes them
    leftovers: list[Path] = field(default_factory=list)
    namespaces: bool = True                           # enter new user/mount/ipc/net namespaces


def python_paths() -> list[Path]:
    """What the interpreter may still import from: its prefixes, pyvirt's own directory and
    sys.path -- less the working directory (`python -m` puts it first: a daemon started in /
    would otherwise open the whole filesystem) and /."""
    out = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), Path(sys.base_exec_prefix),
           Path(__file__).resolve().parents[1]}
    cwd = Path.cwd().resolve()
    for p in sys.path:
        if p and Path(p).is_absolute() and Path(p).exists() and Path(p).resolve() != cwd:
            out.add(Path(p))
    return sorted(p for p in out if p.resolve() != Path("/"))


def apply(jail: Jail) -> dict[str, Any]:
    """Confine this process; a report {layer: {"on": bool, ...}} of what took effect (a layer
    the host forbids is off, with the reason)."""
    report: dict[str, Any] = {}

    def layer(name: str, fn: Any) -> None:
        try:
            info = fn() or {}
            report[name] = {"on": True, **info}
        except (OSError, AttributeError) as e:
            report[name] = {"on": False, "reason": str(e)}

    try:
        seccomp: ctypes.CDLL | None = _libseccomp()        # (loaded before Landlock hides it)
    except OSError as e:
        seccomp, why = None, f"libseccomp is not available: {e}"
    if jail.namespaces:
        layer("namespaces", enter_namespaces)        # (first: capabilities are needed to make them)
    else:
        report["namespaces"] = {"on": False, "reason": "not asked for"}
    layer("no_new_privs", lambda: _prctl(PR_SET_NO_NEW_PRIVS, 1) and None)
    layer("capabilities", drop_capabilities)
    abi = landlock_abi()
    if abi:
        layer("landlock", lambda: apply_landlock(jail.rw, [*jail.ro, *python_paths(), Path("/dev/null"),
                                                           Path("/dev/urandom")], abi))
    else:
        report["landlock"] = {"on": False, "reason": "the kernel has no Landlock (or it is disabled)"}
    if seccomp is None:
        report["seccomp"] = {"on": False, "reason": why}
    elif report["no_new_privs"]["on"]:
        layer("seccomp", lambda: apply_seccomp(seccomp))
    else:
        report["seccomp"] = {"on": False, "reason": "no_new_privs could not be set"}
    return report


def _spec_files(obj: Any) -> list[Path]:
    """Every existing absolute path named in a spec (JSON form): images, kernel, initrd."""
    out: list[Path] = []
    if isinstance(obj, dict):
        for v in obj.values():
            out += _spec_files(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _spec_files(v)
    elif isinstance(obj, str) and obj.startswith("/") and "\0" not in obj:
        with suppress(OSError, ValueError):
            if Path(obj).exists():
                out.append(Path(obj))
    return out


def runner_jail(vm_dir: Path, snapshots_dir: Path, spec: Any, board: Any) -> Jail:
    """The jail of a daemon VM's runner: read/write beneath its VM directory (console log,
    sockets, overlays, disks.json, exit.json), the daemon's snapshot directory (a snapshot is
    written where the daemon says, under it) and the private directories of its passts (to
    remove them at the end); read of the files its spec names (images, kernel, initrd) and of
    its disks' backing files."""
    snapshots_dir.mkdir(mode=0o700, exist_ok=True)
    rw = [vm_dir, snapshots_dir]
    leftovers: list[Path] = []
    for nic in getattr(board, "nics", []):
        d = getattr(getattr(nic, "backend", None), "dir", None)
        if d is not None:
            rw.append(Path(d))
            leftovers.append(Path(d))
            if os.geteuid() == 0:       # passt (nobody) has written its PID file; without
                with suppress(OSError):  # CAP_DAC_OVERRIDE the runner removes the directory only as its owner
                    os.chown(d, 0, 0)
    for share in getattr(getattr(board, "host", None), "shares", []):   # virtiofsd's socket directory
        rw.append(Path(share.dir))
        leftovers.append(Path(share.dir))
    # a shared folder is virtiofsd's to read, not the runner's
    files = _spec_files({k: v for k, v in spec.items() if k != "shares"} if isinstance(spec, dict) else spec)
    return Jail(rw=rw, ro=files + _image_chains(board), leftovers=leftovers)


def run_jail(spec: Any, board: Any) -> Jail:
    """The jail of `pyvirt run --jail` once its board is built: read/write of its disks (the
    files: a guest reboot opens them again) and of its passts' private directories; read of
    the other files its spec names and of its disks' backing chains.  The terminal, the
    console and command sockets and passt's socket are open already."""
    disks = [Path(d["path"]) for d in spec.get("disks", []) if isinstance(d, dict)
             and isinstance(d.get("path"), str) and d["path"].startswith("/") and not d.get("read_only")]
    rw: list[Path] = [d for d in disks if d.exists()]
    for nic in getattr(board, "nics", []):
        d = getattr(getattr(nic, "backend", None), "dir", None)
        if d is not None:
            rw.append(Path(d))
    return Jail(rw=rw, ro=[p for p in _spec_files(spec) + _image_chains(board) if p not in rw], leftovers=[])


def _image_chains(board: Any) -> list[Path]:
    """The files of its disks' backing chains (a snapshot reads them again), which the spec
    does not name."""
    out: list[Path] = []
    for slot in getattr(board, "virtio", []):           # (irq, address, VirtioMmio)
        mmio = slot[-1] if isinstance(slot, tuple) else slot
        dev = getattr(mmio, "device", mmio)
        b, depth = getattr(dev, "backend", None), 0
        while b is not None and depth < 64:
            p = getattr(b, "path", None)
            if isinstance(p, (str, Path)) and Path(p).is_absolute():
                out.append(Path(p))
            b, depth = getattr(b, "backing", None), depth + 1
    return out


def remove_leftovers(report: dict[str, Any]) -> None:
    """Remove the directories a jailed runner's report names as left over (only passt's and
    virtiofsd's, in the temporary directory, are believed)."""
    import shutil
    import tempfile
    for d in report.get("leftovers", []) if isinstance(report, dict) else []:
        p = Path(str(d))
        if (p.parent == Path(tempfile.gettempdir()) and p.name.startswith(("pyvirt-passt-", "pyvirt-virtiofsd-"))
                and not p.is_symlink()):
            shutil.rmtree(p, ignore_errors=True)


def disabled(reason: str) -> dict[str, Any]:
    return {name: {"on": False, "reason": reason} for name in LAYERS}


# -- the self-test ---------------------------------------------------------------------------------
def _try(fn: Any) -> str:
    try:
        fn()
    except OSError as e:
        return f"refused: {errno.errorcode.get(e.errno or 0, e.errno)}"
    return "allowed"


def selftest(directory: Path, read: Path | None, sock: Path | None, tcp: int | None,
             abstract: str | None = None) -> dict[str, Any]:
    report = apply(Jail(rw=[directory], ro=[read] if read else []))
    out: dict[str, Any] = {"jail": report, "caps": capabilities_now()}

    def read_outside() -> None:
        with open("/etc/hostname", "rb") as f:
            f.read()

    def write_inside() -> None:
        (directory / "inside").write_text("ok")

    def create_outside() -> None:
        with open("/tmp/pyvirt-jail-escape", "w") as f:
            f.write("x")

    def connect_unix() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(sock))
        finally:
            s.close()

    def connect_abstract() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect("\0" + str(abstract))
        finally:
            s.close()

    def connect_tcp() -> None:
        s = socket.create_connection(("127.0.0.1", tcp or 1), timeout=2)
        s.close()

    def exec_prog() -> None:
        pid = os.fork()          # (refused by the filter; an exec in this process would end the test)
        if pid == 0:
            try:
                os.execv("/bin/true", ["/bin/true"])
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 127:
            raise PermissionError(errno.EACCES, "exec refused in the child")

    def execve_here() -> None:
        os.execv("/bin/true", ["/bin/true"])        # refused, or this process is gone

    def raise_cap() -> None:
        capset(1 << 21, 1 << 21)                    # CAP_SYS_ADMIN

    def setuid() -> None:
        os.setuid(65534)

    out["tries"] = {
        "read_inside": _try(lambda: (directory / "inside").read_text()) if _try(write_inside) == "allowed"
        else "write refused",
        "read_given": _try(lambda: read.read_bytes()[:1]) if read else "n/a",
        "read_outside": _try(read_outside),
        "create_outside": _try(create_outside),
        "connect_unix": _try(connect_unix) if sock else "n/a",
        "connect_tcp": _try(connect_tcp) if tcp else "n/a",
        "connect_abstract": _try(connect_abstract) if abstract else "n/a",
        "fork_exec": _try(exec_prog),
        "execve": _try(execve_here),
        "raise_capability": _try(raise_cap),
        "setuid": _try(setuid),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyvirt.host.jail")
    ap.add_argument("--selftest", action="store_true", required=True)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--read", type=Path)
    ap.add_argument("--socket", type=Path)
    ap.add_argument("--tcp", type=int)
    ap.add_argument("--abstract", help="an abstract Unix socket's name to try")
    a = ap.parse_args(argv)
    print(json.dumps(selftest(a.dir, a.read, a.socket, a.tcp, a.abstract), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
