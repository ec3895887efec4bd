"""One VM request: what a user asks for, however they ask (`pyvirt run`, `pyvirt create`, the
REST API, the Python Client), and the one resolver from it to a `VmSpec`.

    VmRequest      every user-level option of a VM, in the user's syntax (--disk/--net text,
                   sizes as typed); the API's VmCreate is this plus a name
    OPTIONS        the flags: one row each (flags, field, help, which verbs); `add_arguments`
                   builds `pyvirt run`'s and `pyvirt create`'s parsers from it, `from_args`
                   turns either verb's parsed arguments into a VmRequest
    resolve()      VmRequest -> VmSpec: the guest (default image, --image debian with its root
                   disk, --oci IMAGE through pyvirt.oci, --kernel/--initrd/--bios), --command on the kernel command line or
                   through ports, --port forwards onto the user network; the only place that
                   resolves a guest

A device's VmSpec field that carries a `spec.Flag` needs nothing here: its VmRequest field,
its OPTIONS row and its resolution come from the Flag (`_follow_device_fields`; a virtio
device is its device file, backend, table row and spec field -- docs/devices.md).  Any other
new VM option is a VmRequest field, an OPTIONS row and its use in resolve().  Errors are
one-line ConfigErrors in the words of the flags (`--memory 1T: at most 64G`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from pyvirt.engines import ENGINES, EngineName
from pyvirt.errors import ConfigError
from pyvirt.fsutil import open_regular
from pyvirt.spec import (
    DEVICE_FIELD_HOOKS,
    DiskSpec,
    Flag,
    NetSpec,
    PortSpec,
    ShareSpec,
    VmSpec,
    add_model_field,
    device_flags,
    format_size,
    limit_message,
    make_spec,
    parse_port_forward,
    parse_size,
    remove_model_field,
)

IMAGES = ("default", "debian")
DEFAULT_MEMORY = "256M"
DEBIAN_MEMORY = "1G"


class VmRequest(BaseModel):
    """A VM as a user asks for it.  Without kernel, bios or image it runs the default guest
    (lean Linux + busybox); with `command` the guest runs that shell command and powers off
    with its exit status."""

    model_config = ConfigDict(extra="forbid")
    cpus: int = Field(1, ge=1, le=8, description="harts")
    memory: int | str | None = Field(None, description="guest RAM: bytes, or a size such as 256M "
                                                       "(default 256M; 1G with image debian)")
    image: Literal["default", "debian"] | None = Field(None, description="guest image: default or debian")
    root_disk: str | None = Field(None, description="with image debian: the root disk, a qcow2 overlay "
                                                    "over the cached image (made if missing)")
    kernel: str | None = Field(None, description="Linux Image (default: the default guest's)")
    initrd: str | None = None
    append: str | None = Field(None, description="kernel command line")
    bios: str | None = Field(None, description="M-mode ELF to start instead of the built-in SBI")
    disks: list[str] = Field(default_factory=list,
                             description="PATH[,ro][,format=raw|qcow2][,bw=RATE][,iops=N][,burst=SIZE] (as --disk)")
    nets: list[str] = Field(default_factory=list,
                            description="user[,port=H:G][,host-loopback=on]|stream=SOCK|network=NAME|tap=IF[,mac=M][,bw=|tx_bw=|rx_bw=RATE] "
                                        "(as --net)")
    ports: list[str] = Field(default_factory=list, description="HOST:GUEST TCP forwards onto the user network "
                                                               "(as --port)")
    vports: list[str] = Field(default_factory=list, description="NAME=SOCKET virtio-console ports (as --vport)")
    shares: list[str] = Field(default_factory=list, description="HOSTDIR:TAG[,ro] shared host folders, "
                                                                "mounted on /mnt/TAG (as --share)")
    rng: bool = Field(True, description="a virtio-rng device")
    # (+ a field per VmSpec device field that carries a spec.Flag: _follow_device_fields)
    mmu: Literal["sv39", "sv48"] = "sv39"
    command: str | None = Field(None, description="shell command the guest runs, then powers off")
    engine: EngineName | None = None
    cpu_quota: float | None = Field(None, gt=0, le=64,
                                    description="CPU time ceiling in CPUs (0.5: half of one CPU; pyvirtd)")
    memory_limit: int | str | None = Field(
        None, description="the runner's memory ceiling (default: memory + 256M for the VMM; pyvirtd)")
    # a container image run as the VM (pyvirt.oci; docs/oci.md)
    oci: str | None = Field(None, description="an OCI image: layout directory, docker save tarball or "
                                              "HOST[:PORT]/NAME[:TAG|@DIGEST]")
    oci_args: list[str] = Field(default_factory=list, description="with oci: the command instead of the image's Cmd")
    env: list[str] = Field(default_factory=list, description="with oci: KEY=VALUE environment entries (as -e)")
    workdir: str | None = Field(None, description="with oci: the process's working directory (as -w)")
    user: str | None = Field(None, description="with oci: USER[:GROUP], names or ids (as -u)")
    tty: bool = Field(False, description="with oci: the process on a pseudo-terminal relayed to the console (as -t)")
    volumes: list[str] = Field(default_factory=list, description="with oci: HOSTDIR:GUESTDIR[:ro] host folders "
                                                                 "mounted in the container (as -v)")
    interactive: bool = Field(False, description="with oci: keep stdin open (as -i; pyvirt run always does)")


# -- the flags ----------------------------------------------------------------------------------
RUN, CREATE = "run", "create"
BOTH = frozenset((RUN, CREATE))


@dataclass(frozen=True)
class Option:
    """One flag: `field` is the VmRequest field it sets (None: a verb's own option, read by that
    verb); `path`: its value names a host file (made absolute, for the daemon)."""

    flags: tuple[str, ...]
    help: str
    field: str | None = None
    verbs: frozenset[str] = BOTH
    metavar: str | None = None
    type: Any = None
    choices: tuple[str, ...] | None = None
    repeated: bool = False
    switch: Any = None            # a flag without a value: the field's value when given
    path: Literal["file", "disk", "vport", "share", "volume", None] = None

    @property
    def dest(self) -> str:
        return self.field or self.flags[0].lstrip("-").replace("-", "_")


OPTIONS: list[Option] = [
    Option(("--image",), "guest image: default (lean kernel, busybox initramfs) or debian (Debian trixie "
           "with systemd on a disk; built on first use by pyvirt run, by `pyvirt image build debian` for "
           "pyvirtd)", "image", choices=IMAGES),
    Option(("--root-disk",), "with --image debian: keep the root disk in PATH, a qcow2 overlay over the "
           "cached image (made if missing); without it each run starts from a fresh, throw-away overlay "
           "(pyvirt create needs it: a daemon VM keeps its disk)", "root_disk", metavar="PATH", path="file"),
    Option(("--kernel",), "Linux Image or ELF vmlinux to boot", "kernel", path="file"),
    Option(("--initrd",), "initramfs/initrd to load", "initrd", path="file"),
    Option(("--append",), "kernel command line", "append"),
    Option(("--bios",), "M-mode ELF to start instead of the built-in SBI (OpenSBI, bare metal)", "bios",
           path="file"),
    Option(("--cpus",), "number of harts, 1..8 (default 1)", "cpus", type=int),
    Option(("--memory", "-m"), "RAM size (default 256M; 1G with --image debian)", "memory"),
    Option(("--disk",), "attach a disk image (raw or qcow2, probed; ,format=raw|qcow2 to say which) "
           "as virtio-blk (repeatable)", "disks", metavar="PATH[,ro]", repeated=True, path="disk"),
    Option(("--share",), "share host directory HOSTDIR with the guest as virtio-fs TAG, mounted on /mnt/TAG "
           "(repeatable; ,ro: read-only, enforced by the host; needs root: virtiofsd)", "shares",
           metavar="HOSTDIR:TAG[,ro]", repeated=True, path="share"),
    Option(("--no-rng",), "no virtio-rng device", "rng", switch=False),
    Option(("--vport",), "a virtio-console port served on a Unix socket (repeatable); the name hvc0 is "
           "the console port, others appear in the guest as named ports", "vports", metavar="NAME=SOCKET",
           repeated=True, path="vport"),
    # (+ the device fields' flags here, after --vport: _follow_device_fields)
    Option(("--net",), "a virtio-net interface (repeatable): user (passt user-mode networking; "
           ",port=HOST:GUEST forwards a host TCP port on 127.0.0.1; ,host-loopback=on lets the guest reach the "
           "host's 127.0.0.1 at the gateway address), stream=SOCKET (a Unix socket speaking "
           "QEMU's -netdev stream framing), network=NAME (a switch made by `pyvirt network create NAME`) or "
           "tap=IFNAME (a host TAP device, needs root); ,mac=52:54:00:xx:xx:xx sets the MAC (default: random)",
           "nets", metavar="user|stream=SOCKET|network=NAME|tap=IFNAME", repeated=True),
    Option(("--port", "-p"), "forward TCP port HOST on the host's 127.0.0.1 to GUEST in the guest (repeatable; "
           "implies --net user when no --net is given)", "ports", metavar="HOST:GUEST", repeated=True),
    Option(("--engine",), "CPU engine: interp (reference interpreter), jit (Python blocks) or native "
           "(x86-64 code; the default where the host allows; PYVIRT_ENGINE sets the default)", "engine",
           choices=ENGINES),
    Option(("--mmu",), "MMU mode in the device tree (default sv39)", "mmu", choices=("sv39", "sv48")),
    Option(("--command", "-c"), "run CMD in the guest's shell (the default guest: from its /init; debian: "
           "once systemd has booted), print its output (pyvirt create: to the VM's log), exit with its "
           "status", "command", metavar="CMD"),
    Option(("--cpu-quota",), "CPU time ceiling in CPUs, e.g. 0.5 (a cgroup limit where the host allows)",
           "cpu_quota", verbs=frozenset((CREATE,)), metavar="CPUS", type=float),
    Option(("--memory-limit",), "the VM process's memory ceiling (default: --memory + 256M)",
           "memory_limit", verbs=frozenset((CREATE,)), metavar="SIZE"),
    Option(("--oci",), "run an OCI container image as the VM (docs/oci.md): an OCI layout directory "
           "(DIR[:TAG]), a `docker save` tarball or a registry reference HOST[:PORT]/NAME[:TAG|@sha256:...]; "
           "a CMD after the flags replaces the image's Cmd", "oci", metavar="IMAGE"),
    Option(("--env", "-e"), "with --oci: set KEY=VALUE in the process's environment (KEY alone: this "
           "process's value; repeatable)", "env", metavar="KEY=VALUE", repeated=True),
    Option(("--workdir", "-w"), "with --oci: the process's working directory", "workdir", metavar="DIR"),
    Option(("--user", "-u"), "with --oci: run as USER[:GROUP] (names from the image's /etc/passwd and "
           "/etc/group, or ids)", "user", metavar="USER"),
    Option(("--volume", "-v"), "with --oci: mount host directory HOSTDIR on GUESTDIR in the container "
           "(a shared folder, virtio-fs; repeatable; :ro read-only, enforced by the host; needs root: "
           "virtiofsd)", "volumes", metavar="HOSTDIR:GUESTDIR[:ro]", repeated=True, path="volume"),
    Option(("--tty", "-t"), "with --oci: the process runs on a pseudo-terminal relayed to the console "
           "(Ctrl-C reaches it)",
           "tty", switch=True),
    Option(("--interactive", "-i"), "with --oci: keep stdin open (pyvirt run always passes stdin)",
           "interactive", switch=True),
    Option(("--rm",), "with --oci: throw the container's disk away at exit (pyvirt run always does; "
           "pyvirt create --oci keeps it in --root-disk)", verbs=frozenset((RUN,)), switch=True),
    # pyvirt run's own: how this one process runs the VM (a daemon VM runs until stopped)
    Option(("--timeout",), "stop the VM after this many seconds (exit status 124)", verbs=frozenset((RUN,)),
           type=float),
    Option(("--stats",), "print instructions run and MIPS at exit", verbs=frozenset((RUN,)), switch=True),
    Option(("--quiet", "-q"), "no boot progress line on a terminal while the guest has printed nothing",
           verbs=frozenset((RUN,)), switch=True),
    Option(("--restore",), "boot nothing: restore the snapshot in DIR and run it (the machine, disks and "
           "network come from the snapshot; --engine, --timeout, --stats, --snapshot-after still apply)",
           verbs=frozenset((RUN,)), metavar="DIR"),
    Option(("--overlay-dir",), "with --restore: keep the restored VM's disk overlays in DIR (default: a "
           "temporary directory, removed at exit)", verbs=frozenset((RUN,)), metavar="DIR"),
    Option(("--snapshot-after",), "after SECONDS of running, save a snapshot to DIR and exit",
           verbs=frozenset((RUN,)), metavar="SECONDS:DIR"),
]
FLAG = {o.field: o.flags[0] for o in OPTIONS if o.field}   # a field's flag, for messages


def _follow_device_fields() -> None:
    """VmRequest, OPTIONS and FLAG as VmSpec's device fields say (spec.Flag): each one's
    field of the user's text and its flag, after --vport; run on import and whenever a
    device field is added or removed (spec.add_device_field)."""
    flags = device_flags()
    for name in [n for n, o in _DEVICE_OPTIONS.items() if n not in flags]:
        OPTIONS.remove(_DEVICE_OPTIONS.pop(name))
        del FLAG[name]
        remove_model_field(VmRequest, name)
    for name, flag in flags.items():
        if name in _DEVICE_OPTIONS:
            continue
        info = (FieldInfo(annotation=list[str], default_factory=list, description=flag.description)
                if flag.repeated else
                FieldInfo(annotation=Optional[str], default=None, description=flag.description))  # type: ignore[arg-type]
        add_model_field(VmRequest, name, info)
        option = Option(flag.flags, flag.help, name, verbs=frozenset(flag.verbs), metavar=flag.metavar,
                        repeated=flag.repeated, path=flag.path)
        at = OPTIONS.index(next(o for o in OPTIONS if o.field == "vports")) + 1 + len(_DEVICE_OPTIONS)
        OPTIONS.insert(at, option)
        _DEVICE_OPTIONS[name] = option
        FLAG[name] = flag.flags[0]


_DEVICE_OPTIONS: dict[str, Option] = {}
_follow_device_fields()
DEVICE_FIELD_HOOKS.append(_follow_device_fields)


class _NotHere(argparse.Action):
    """Another verb's flag: one line that says whose it is (not 'unrecognized arguments')."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        verb = next(iter(self.const))
        why = " (a pyvirtd VM runs until `pyvirt stop`)" if verb == RUN else ""
        parser.error(f"{self.option_strings[0]} goes with pyvirt {verb}{why}")


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """`verb`'s flags from OPTIONS (every one defaults to None: unset fields keep VmRequest's
    defaults); the other verb's own flags are refused by name, hidden from --help."""
    for o in OPTIONS:
        if verb not in o.verbs:
            parser.add_argument(*o.flags, dest=f"_not_{o.dest}", action=_NotHere, const=o.verbs,
                                nargs=0 if o.switch is not None else None, help=argparse.SUPPRESS)
            continue
        kw: dict[str, Any] = {"dest": o.dest, "help": o.help, "default": None}
        if o.switch is not None:
            kw.update(action="store_const", const=o.switch)
        else:
            kw.update(action="append" if o.repeated else "store", metavar=o.metavar, type=o.type,
                      choices=o.choices)
        parser.add_argument(*o.flags, **kw)
    if verb == RUN:     # (pyvirt create's NAME comes first: a CMD there would swallow the flags)
        parser.add_argument("oci_args", nargs=argparse.REMAINDER, metavar="CMD",
                            help="with --oci: the command and its arguments, instead of the image's Cmd")


def _absolute(o: Option, value: str) -> str:
    """A path-valued flag's value with its path made absolute (the daemon runs elsewhere)."""
    if o.path == "file":
        return os.path.abspath(os.path.expanduser(value))
    if o.path == "disk":
        path, sep, opts = value.partition(",")
        return os.path.abspath(os.path.expanduser(path)) + sep + opts if path else value
    if o.path == "share":
        path, sep, tag = value.rpartition(":")
        return os.path.abspath(os.path.expanduser(path)) + sep + tag if sep and path else value
    if o.path == "volume":
        path, sep, rest = value.partition(":")
        return os.path.abspath(os.path.expanduser(path)) + sep + rest if sep and path else value
    if o.path == "vport":
        name, sep, sock = value.partition("=")
        return name + sep + os.path.abspath(os.path.expanduser(sock)) if sep and sock else value
    return value


def from_args(args: argparse.Namespace, verb: str, absolute: bool = False) -> VmRequest:
    """The VmRequest of `verb`'s parsed flags (`absolute`: host paths made absolute)."""
    fields: dict[str, Any] = {}
    for o in OPTIONS:
        if o.field is None or verb not in o.verbs:
            continue
        value = getattr(args, o.dest, None)
        if value is None:
            continue
        if absolute and o.path is not None:
            value = [_absolute(o, v) for v in value] if o.repeated else _absolute(o, value)
        fields[o.field] = value
    if getattr(args, "oci_args", None):
        fields["oci_args"] = args.oci_args
    return request(**fields)


def request(**fields: Any) -> VmRequest:
    """A VmRequest, its validation errors one line in the flags' words."""
    try:
        return VmRequest(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        value = fields.get(name)
        what = FLAG.get(name, name)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            what += f" {format(value, 'g') if isinstance(value, float) else value}"
        raise ConfigError(f"{what}: {limit_message(dict(err))}") from None


# -- the resolver -------------------------------------------------------------------------------
@dataclass
class Resolved:
    """A request resolved: the spec, and what the caller must run or clean up with it."""

    spec: VmSpec
    pipe: Any = None                  # a guestcmd.CommandPipe: --command's stdio through ports
    overlay_dir: Any = None           # a TemporaryDirectory holding a throw-away Debian root disk
    memory_typed: str = DEFAULT_MEMORY

    def cleanup(self) -> None:
        if self.pipe is not None:
            self.pipe.finish()
        if self.overlay_dir is not None:
            self.overlay_dir.cleanup()


def _size(value: int | str, flag: str) -> int:
    try:
        return parse_size(value)
    except ConfigError:
        raise ConfigError(f"{flag} {value}: expected a size such as 256M or 1G") from None


def _existing(path: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    return p.absolute()


def _new_root_disk_ok(path: str | None) -> None:
    """pyvirtd's --root-disk: absolute (the daemon runs elsewhere; the CLI makes it so), an
    existing file, or a new one named *.qcow2 in an existing directory (the daemon runs as its
    user, often root: a request never makes a file of any other name)."""
    if path is None:
        raise ConfigError("--image debian under pyvirtd needs --root-disk PATH (the VM's root disk, "
                          "kept across starts; made if missing)")
    p = Path(path)
    if not p.is_absolute():
        raise ConfigError(f"--root-disk {path}: must be an absolute path for pyvirtd")
    if p.exists():
        if not p.is_file():
            raise ConfigError(f"--root-disk {path}: not a file")
    elif p.suffix != ".qcow2" or not p.parent.is_dir():
        raise ConfigError(f"--root-disk {path}: a new root disk is a PATH.qcow2 in an existing directory")


def _is_opensbi(path: str) -> bool:
    try:                                  # (a FIFO or a device: the boot says so)
        with open_regular(path) as f:
            return b"OpenSBI" in f.read(16 << 20)
    except OSError:
        return False                      # (the boot says why it cannot read it)


def _image(name: str, build: bool) -> Any:
    """Guest image `name` (its kernel, initrd and cmdline): built on demand when `build` (with
    progress on a terminal), else the cached one or a ConfigError saying how to build it."""
    from pyvirt.images import cached_default_image, default_image
    from pyvirt.images.debian_image import cached_debian_image, debian_image
    if build:
        make = debian_image if name == "debian" else default_image
        return make(build=True, progress=sys.stderr.isatty())
    img = cached_debian_image() if name == "debian" else cached_default_image()
    if img is None:
        how = "`pyvirt image build debian`" if name == "debian" else "`pyvirt image build` (or give a kernel)"
        raise ConfigError(f"the {'Debian image' if name == 'debian' else 'default guest'} is not built: run {how}")
    return img


def resolve(req: VmRequest, *, daemon: bool = False, pipe: bool = False) -> Resolved:
    """The VmSpec of `req`.

    `daemon`: for pyvirtd -- guest images must be built already (no build on demand), every
    file must exist now (paths made absolute: the runner starts elsewhere, later), and a Debian
    root disk must be named (--root-disk: a daemon VM keeps its disk across starts).
    `pipe`: --command on the default guest gets stdin, stdout and stderr through virtio-console
    ports (this process's stdio; `pyvirt run`) instead of the kernel command line."""
    from pyvirt.engines import default_engine
    from pyvirt.guestcmd import CommandPipe, command_append, command_ports_append

    disks = [DiskSpec.parse(d) for d in req.disks]
    if daemon:
        for d in disks:
            d.path = _existing(str(d.path), "--disk")
    vports = [PortSpec.parse(p) for p in req.vports]
    shares = [ShareSpec.parse(sh) for sh in req.shares]
    for sh in shares:
        if not sh.path.is_dir():
            raise ConfigError(f"--share {sh.path}:{sh.tag}: no such directory")
        sh.path = sh.path.expanduser().absolute()
    nets = _nets(req.nets, req.ports)
    check = _existing if daemon else (lambda p, _flag: Path(p))
    kernel = check(req.kernel, "--kernel") if req.kernel else None
    initrd = check(req.initrd, "--initrd") if req.initrd else None
    bios = check(req.bios, "--bios") if req.bios else None
    append = req.append
    memory = req.memory if req.memory is not None else DEBIAN_MEMORY if req.image == "debian" else DEFAULT_MEMORY
    memory_bytes = _size(memory, "--memory")
    memory_typed = memory if isinstance(memory, str) else format_size(memory)
    pipe_: Any = None
    overlay_dir: Any = None
    if req.root_disk is not None and req.image != "debian" and req.oci is None:
        raise ConfigError("--root-disk goes with --image debian or --oci")
    if req.oci is None and (req.oci_args or req.env or req.workdir or req.user or req.tty or req.volumes):
        raise ConfigError(f"{'CMD' if req.oci_args else '-e/-w/-u/-t/-v'} goes with --oci IMAGE")
    if req.oci is not None:
        if req.image or req.kernel or req.initrd or req.bios or req.command is not None:
            raise ConfigError("--oci runs the image's process on the default kernel (no --image, --kernel, "
                              "--initrd, --bios or --command)")
        if daemon:
            _new_root_disk_ok(req.root_disk)
        kernel, initrd, append, overlay_dir, pipe_ = _oci(req, disks, vports, daemon, pipe)
        for i, text in enumerate(req.volumes):     # (mounted by the container's init: oci/data/init)
            volume, guest_dir = _volume(text, f"pyvirt-vol{i}")
            shares.append(volume)
            append += f" pyvirt.volume={volume.tag}:{guest_dir}{':ro' if volume.read_only else ''}"
    elif req.image == "debian":
        if req.kernel or req.initrd or req.bios:
            raise ConfigError("--image debian brings its own kernel and initrd (no --kernel/--initrd/--bios)")
        from pyvirt.images.debian_image import root_overlay
        if daemon:
            _new_root_disk_ok(req.root_disk)
        img = _image("debian", build=not daemon)
        kernel, initrd = img.kernel, img.initrd
        if append is None:
            append = img.cmdline
        try:
            root, overlay_dir = root_overlay(img, req.root_disk)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--root-disk {req.root_disk}: cannot make it: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        disks.insert(0, DiskSpec(path=Path(root).absolute(), format="qcow2"))
        if req.command is not None:
            # systemd stays quiet and no login prompt shares the console with the command's output
            # (TERM=dumb reaches PID 1's environment: systemd then sends no terminal resets)
            append += " TERM=dumb systemd.show_status=0 systemd.mask=serial-getty@ttyS0.service"
    elif bios is None and kernel is None:
        dimg = _image("default", build=not daemon)
        kernel = dimg.kernel
        initrd = initrd or dimg.initrd
        if append is None:
            append = dimg.cmdline
    elif req.command is not None and append is None:
        append = "console=ttyS0"
    try:
        if bios is not None and kernel is None and _is_opensbi(str(bios)):
            raise ConfigError(f"--bios {req.bios} is OpenSBI, which starts a kernel: add --kernel IMAGE "
                              "(as QEMU's -bios fw_dynamic.elf -kernel Image)")
        if req.command is not None:
            if kernel is None:
                raise ConfigError("--command needs a Linux guest (not --bios alone)")
            if pipe and req.image != "debian" and req.kernel is None and req.initrd is None:
                # the default guest: the command, stdin, stdout and stderr through virtio-console ports
                pipe_ = CommandPipe(req.command)
                vports += pipe_.specs
                append = command_ports_append(append)
            else:
                append = command_append(append, req.command)
        if shares and kernel is not None:      # (the board's default command line, then the mounts)
            append = share_append(append if append is not None else "console=ttyS0", shares,
                                  debian=req.image == "debian")
        spec = make_spec(typed={"memory": memory_typed}, cpus=req.cpus, memory=memory_bytes,
                         kernel=kernel, initrd=initrd, append=append, bios=bios, disks=disks,
                         rng=req.rng, ports=vports, nets=nets, shares=shares,
                         engine=req.engine or default_engine(),
                         mmu=req.mmu, **_device_values(req))
    except BaseException:
        Resolved(VmSpec.model_construct(), pipe_, overlay_dir).cleanup()
        raise
    return Resolved(spec, pipe_, overlay_dir, memory_typed)


def _device_values(req: VmRequest) -> dict[str, Any]:
    """The VmSpec device fields the request sets, from their Flags (unset: the spec's default)."""
    out: dict[str, Any] = {}
    for name, flag in device_flags().items():
        text = getattr(req, name, None)
        if text:
            out[name] = [_parse(flag, t) for t in text] if flag.repeated else _parse(flag, text)
    return out


def _parse(flag: Flag, text: str) -> Any:
    try:
        return flag.parse(text)
    except ValidationError as e:
        raise ConfigError(f"{flag.flags[0]} {text}: {limit_message(dict(e.errors()[0]))}") from None
    except ValueError as e:
        raise ConfigError(f"{flag.flags[0]} {text}: {e}") from None


def _oci(req: VmRequest, disks: list[DiskSpec], vports: list[PortSpec], daemon: bool,
         pipe: bool) -> tuple[Path, Path, str, Any, Any]:
    """--oci IMAGE: the default kernel, the container's initrd, its root overlay as the first
    disk and, for pyvirt run without -t, the stdio and signal ports (pyvirt.oci builds the rest)."""
    from pyvirt.oci import RunOptions, container_guest
    from pyvirt.oci.guest import ContainerPipe
    dimg = _image("default", build=not daemon)
    stdio = "console" if daemon or not pipe else "tty" if req.tty else "ports"
    opts = RunOptions(command=req.oci_args, env=req.env, workdir=req.workdir, user=req.user, stdio=stdio)
    assert req.oci is not None
    guest = container_guest(req.oci, opts, dimg.initrd, keep=req.root_disk, persistent=daemon)
    disks.insert(0, DiskSpec(path=guest.root.absolute(), format="qcow2"))
    pipe_ = None
    if stdio == "ports":
        pipe_ = ContainerPipe()          # stdio as --command's, and the signals pyvirt run receives
        vports += pipe_.specs
    return dimg.kernel, guest.initrd, guest.append, guest.tmp, pipe_


def _volume(text: str, tag: str) -> tuple[ShareSpec, str]:
    """-v HOSTDIR:GUESTDIR[:ro]: the share that serves it and the directory it is mounted on."""
    host, sep, rest = text.partition(":")
    guest, _, opt = rest.partition(":")
    if not sep or not host or not guest:
        raise ConfigError(f"-v {text}: expected HOSTDIR:GUESTDIR[:ro]")
    if opt not in ("", "ro", "rw"):
        raise ConfigError(f"-v {text}: unknown option {opt!r} (known: ro, rw)")
    parts = guest.split("/")
    if (not guest.startswith("/") or guest == "/" or ".." in parts or len(guest) > 255
            or not all(c.isprintable() and not c.isspace() and c != ":" for c in guest)):
        raise ConfigError(f"-v {text}: GUESTDIR must be an absolute path other than / without '..', "
                          "spaces or ':'")
    path = Path(host).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError(f"-v {text}: no such directory {path}")
    return ShareSpec(path=path, tag=tag, read_only=opt == "ro"), guest


def share_append(append: str, shares: list[ShareSpec], debian: bool) -> str:
    """The kernel arguments that mount each share on /mnt/TAG: pyvirt.share=TAG[:ro] for the
    default guest's /init, a systemd mount unit (systemd.mount-extra=) for Debian."""
    for sh in shares:
        if debian:
            append += f" systemd.mount-extra={sh.tag}:/mnt/{sh.tag}:virtiofs:{'ro' if sh.read_only else 'rw'},nofail"
        else:
            append += f" pyvirt.share={sh.tag}{':ro' if sh.read_only else ''}"
    return append


def _nets(net_args: list[str], port_args: list[str]) -> list[NetSpec]:
    """--net and --port into NetSpecs: --port forwards go to the first user network (one is
    added when no --net is given)."""
    nets = [NetSpec.parse(n) for n in net_args]
    forwards = [parse_port_forward(p, f"--port {p}") for p in port_args]
    if forwards:
        if not nets:
            nets.append(NetSpec(backend="user"))
        user = next((n for n in nets if n.backend == "user"), None)
        if user is None:
            raise ConfigError("--port needs a user network (--net user)")
        user.ports.extend(forwards)
    return nets
