"""The VM specification: one validated description of a virtual machine.

CLI flags, a TOML file and the API's JSON all produce a `VmSpec`; device
models never parse user input.

A device's `VmSpec` field may carry its user-facing side as a `Flag` (`Annotated[...,
Flag(...)]`): request.py derives from it the `pyvirt run`/`pyvirt create` flag, the
VmRequest (REST API) field and its resolution to the spec value, so adding such a device
edits nothing in request.py (docs/devices.md, "Adding a virtio device").  A device defined
outside this file (a test's, a plugin's) adds its field with `add_device_field`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from pyvirt.engines import EngineName, default_engine
from pyvirt.errors import ConfigError

MIB = 1 << 20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": MIB, "k": 1 << 10, "m": MIB, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int, default_unit: str = "m") -> int:
    """'256M', '1G', '1.5G', '512' (MiB, or `default_unit`) -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"invalid size {text!r} (examples: 256M, 1G, 1.5G)")
    unit = m.group(2).lower() or default_unit
    number = m.group(1)
    if "." not in number:
        return int(number) * _UNITS[unit]
    whole, frac = number.split(".")
    return int(whole) * _UNITS[unit] + int(frac) * _UNITS[unit] // 10 ** len(frac)


def format_size(n: int) -> str:
    """Bytes as a user writes them: 64G, 320M, 1536K (or a plain number of bytes)."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_rate(text: str, where: str) -> int:
    """A rate limit: '20M' (bytes/s, binary units), '500' (plain number), positive."""
    try:
        value = int(text) if text.strip().isdigit() else parse_size(text)
    except ConfigError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{where}: expected a positive number such as 500 or 20M, not {text!r}")
    return value


class DiskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path
    read_only: bool = False
    format: Literal["auto", "raw", "qcow2"] = "auto"
    bw: int | None = Field(None, gt=0)          # bytes/s
    iops: int | None = Field(None, gt=0)        # requests/s
    burst: int = Field(0, ge=0)                 # one-time burst, bytes, on top of bw

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        """'PATH[,ro][,format=raw|qcow2][,bw=RATE][,iops=N][,burst=SIZE]' as given to --disk."""
        path, *opts = text.split(",")
        fields: dict[str, object] = {"read_only": False, "format": "auto"}
        for o in opts:
            key, _, value = o.partition("=")
            if o in ("ro", "readonly", "read-only"):
                fields["read_only"] = True
            elif o in ("rw",):
                fields["read_only"] = False
            elif key == "format" and value in ("auto", "raw", "qcow2"):
                fields["format"] = value
            elif key in ("bw", "iops", "burst") and value:
                fields[key] = parse_rate(value, f"--disk {text}: {key}")
            else:
                raise ConfigError(f"unknown disk option {o!r} in --disk {text} "
                                  "(known: ro, rw, format=raw, format=qcow2, bw=RATE, iops=N, burst=SIZE)")
        if not path:
            raise ConfigError("--disk needs a path")
        return cls(path=Path(path), **fields)  # type: ignore[arg-type]


_SHARE_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,35}$")


class ShareSpec(BaseModel):
    """A shared host folder (virtio-fs, served by virtiofsd): the guest mounts `tag`
    (the default guest and the Debian image on /mnt/TAG); `read_only` is enforced by the host."""

    model_config = ConfigDict(extra="forbid")
    path: Path
    tag: str
    read_only: bool = False

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        if not _SHARE_TAG.match(v):
            raise ValueError(f"a share's tag is 1..36 letters, digits, '.', '_' or '-', not {v!r}")
        return v

    @classmethod
    def parse(cls, text: str) -> ShareSpec:
        """'HOSTDIR:TAG[,ro]' as given to --share (the last ':' ends the directory)."""
        path, sep, rest = text.rpartition(":")
        tag, *opts = rest.split(",")
        if not sep or not path:
            raise ConfigError(f"--share {text}: expected HOSTDIR:TAG[,ro]")
        read_only = False
        for o in opts:
            if o in ("ro", "readonly", "read-only"):
                read_only = True
            elif o != "rw":
                raise ConfigError(f"unknown share option {o!r} in --share {text} (known: ro, rw)")
        if not _SHARE_TAG.match(tag):
            raise ConfigError(f"--share {text}: a tag is 1..36 letters, digits, '.', '_' or '-'")
        return cls(path=Path(path), tag=tag, read_only=read_only)


_PORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PortSpec(BaseModel):
    """A virtio-console port: `hvc0` is the console port, other names are named ports;
    the host side is a Unix socket pyvirt listens on."""

    model_config = ConfigDict(extra="forbid")
    name: str
    socket: Path

    @classmethod
    def parse(cls, text: str) -> PortSpec:
        """'NAME=SOCKET' as given to --vport."""
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise ConfigError(f"--vport {text}: expected NAME=SOCKET-PATH")
        if not _PORT_NAME.match(name):
            raise ConfigError(f"--vport {text}: a port name is letters, digits, '.', '_' or '-'")
        return cls(name=name, socket=Path(path))


class VsockSpec(BaseModel):
    """virtio-vsock: the guest's CID and the Unix socket the VMM listens on (host clients
    write `CONNECT <port>`; a guest connecting to host port P reaches SOCKET_P)."""

    model_config = ConfigDict(extra="forbid")
    socket: Path
    cid: int = Field(3, ge=3, lt=0xFFFF_FFFF)

    @classmethod
    def parse(cls, text: str) -> VsockSpec:
        """'SOCKET' as given to --vsock (guest CID 3)."""
        return cls(socket=Path(text))


@dataclass(frozen=True)
class Flag:
    """A device field's user-facing side, declared on its VmSpec field (`Annotated[T,
    Flag(...)]`).  request.py makes of it the flag (`flags`, `help`, `metavar`, for the
    `verbs` among "run" and "create"), the VmRequest field of the same name (the user's text:
    `str | None`, or `list[str]` when `repeated`; `description` is the API's) and the spec
    value (`parse(text)`, each text when repeated; an empty request leaves the field's
    default).  `path="file"`: the text names a host file, made absolute for the daemon."""

    flags: tuple[str, ...]
    help: str
    description: str
    parse: Callable[[str], Any]
    metavar: str | None = None
    verbs: tuple[str, ...] = ("run", "create")
    repeated: bool = False
    path: Literal["file"] | None = None


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def random_mac() -> str:
    """A locally administered unicast address in QEMU's 52:54:00 range, random per VM."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


def parse_port_forward(text: str, where: str) -> tuple[int, int]:
    """'HOST:GUEST' (TCP ports) -> (host, guest)."""
    host, sep, guest = text.partition(":")
    try:
        pair = (int(host), int(guest)) if sep else None
    except ValueError:
        pair = None
    if pair is None or not all(1 <= p <= 65535 for p in pair):
        raise ConfigError(f"{where}: expected HOST:GUEST with TCP ports 1..65535, not {text!r}")
    return pair


class NetSpec(BaseModel):
    """A virtio-net interface and its host side: `user` (passt, with forwarded host ports),
    `stream` (a Unix socket speaking QEMU's -netdev stream framing), `network` (the switch of a
    `pyvirt network create` network, found by name when the VM starts) or `tap` (a TAP device)."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["user", "stream", "network", "tap"] = "user"
    socket: Path | None = None                  # stream
    network: str | None = None                  # network
    ifname: str | None = None                   # tap
    ports: list[tuple[int, int]] = Field(default_factory=list)     # user: (host, guest) TCP
    # user: whether the gateway's address reaches the host's loopback (passt maps it unless
    # --no-map-gw); off by default: a guest reaches no service on the host's 127.0.0.1
    host_loopback: bool = False
    mac: str = Field(default_factory=random_mac)
    tx_bw: int | None = Field(None, gt=0)       # bytes/s the guest may send
    rx_bw: int | None = Field(None, gt=0)       # bytes/s the guest is given

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        v = v.lower()
        if not _MAC.match(v):
            raise ValueError(f"invalid MAC address {v!r} (expected six hex pairs like 52:54:00:12:34:56)")
        if int(v[:2], 16) & 1:
            raise ValueError(f"MAC address {v} is a multicast address")
        return v

    @classmethod
    def parse(cls, text: str) -> NetSpec:
        """'user[,port=H:G]...[,host-loopback=on][,mac=M]', 'stream=SOCKET[,mac=M]', 'network=NAME[,mac=M]' or
        'tap=IFNAME[,mac=M]' (--net), each with [,bw=RATE] or [,tx_bw=RATE][,rx_bw=RATE]."""
        first, *opts = text.split(",")
        kind, _, value = first.partition("=")
        fields: dict[str, object] = {}
        if kind == "user" and not value:
            fields["backend"] = "user"
        elif kind == "stream" and value:
            fields.update(backend="stream", socket=Path(value))
        elif kind == "network" and value:
            fields.update(backend="network", network=value)
        elif kind == "tap" and value:
            fields.update(backend="tap", ifname=value)
        else:
            raise ConfigError(f"--net {text}: expected user[,port=HOST:GUEST...], stream=SOCKET, "
                              "network=NAME or tap=IFNAME")
        ports: list[tuple[int, int]] = []
        for o in opts:
            if o.startswith("mac="):
                fields["mac"] = o[4:]
            elif o.startswith("port=") and kind == "user":
                ports.append(parse_port_forward(o[5:], f"--net {text}"))
            elif o.startswith("host-loopback=") and kind == "user":
                if o[14:] not in ("on", "off"):
                    raise ConfigError(f"--net {text}: host-loopback is on or off, not {o[14:]!r}")
                fields["host_loopback"] = o[14:] == "on"
            elif o.partition("=")[0] in ("bw", "tx_bw", "rx_bw") and o.partition("=")[2]:
                key, _, value = o.partition("=")
                rate = parse_rate(value, f"--net {text}: {key}")
                fields.update({"tx_bw": rate, "rx_bw": rate} if key == "bw" else {key: rate})
            else:
                known = "port=HOST:GUEST, host-loopback=on|off, mac=MAC" if kind == "user" else "mac=MAC"
                known += ", bw=RATE, tx_bw=RATE, rx_bw=RATE"
                raise ConfigError(f"unknown network option {o!r} in --net {text} (known: {known})")
        fields["ports"] = ports
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except ValidationError as e:
            raise ConfigError(f"--net {text}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") \
                from None

    @model_validator(mode="after")
    def _backend_fields(self) -> NetSpec:
        if self.backend == "stream" and self.socket is None:
            raise ValueError("a stream network needs a socket path")
        if self.backend == "network" and not self.network:
            raise ValueError("a network interface needs a network name")
        if self.backend == "tap" and not self.ifname:
            raise ValueError("a tap network needs an interface name")
        if self.ports and self.backend != "user":
            raise ValueError("port forwarding needs the user network")
        if self.host_loopback and self.backend != "user":
            raise ValueError("host-loopback is an option of the user network")
        return self


class VmSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpus: int = Field(1, ge=1, le=8)
    memory: int = Field(256 * MIB, ge=16 * MIB, le=64 << 30)
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    bios: Path | None = None
    disks: list[DiskSpec] = Field(default_factory=list)
    rng: bool = True
    ports: list[PortSpec] = Field(default_factory=list)       # virtio-console ports
    nets: list[NetSpec] = Field(default_factory=list)         # virtio-net interfaces
    shares: list[ShareSpec] = Field(default_factory=list)     # virtio-fs shared folders
    vsock: Annotated[VsockSpec | None, Flag(                  # virtio-vsock
        ("--vsock",), "a virtio-vsock device (guest CID 3); the VMM listens on the Unix socket SOCKET "
        "(a host client writes 'CONNECT PORT' and reads 'OK ...'; the guest reaches host port P at "
        "SOCKET_P; with --restore: the restored VM's socket)",
        "SOCKET: a virtio-vsock device (guest CID 3) served on this Unix socket (as --vsock; pyvirtd "
        "VMs always have one)", VsockSpec.parse, metavar="SOCKET", verbs=("run",), path="file")] = None
    engine: EngineName = Field(default_factory=default_engine)
    mmu: Literal["sv39", "sv48"] = "sv39"

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        return parse_size(v) if isinstance(v, str) else v

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, v: list[PortSpec]) -> list[PortSpec]:
        names = [p.name for p in v]
        if len(set(names)) != len(names):
            raise ValueError("port names must be unique")
        if len(v) > 15:
            raise ValueError("at most 15 ports")
        return v

    @field_validator("nets")
    @classmethod
    def _unique_host_ports(cls, v: list[NetSpec]) -> list[NetSpec]:
        hosts = [h for n in v for h, _ in n.ports]
        if len(set(hosts)) != len(hosts):
            raise ValueError("a host port can be forwarded only once")
        return v

    @field_validator("shares")
    @classmethod
    def _unique_tags(cls, v: list[ShareSpec]) -> list[ShareSpec]:
        tags = [sh.tag for sh in v]
        if len(set(tags)) != len(tags):
            raise ValueError("share tags must be unique")
        return v

    @field_validator("memory")
    @classmethod
    def _page_multiple(cls, v: int) -> int:
        if v % (1 << 21):
            raise ValueError("must be a multiple of 2 MiB")
        return v


# -- device fields: their flags, and fields added from outside this file ---------------------
def device_flags() -> dict[str, Flag]:
    """VmSpec's fields that carry a Flag, in field order."""
    return {name: m for name, f in VmSpec.model_fields.items() for m in f.metadata if isinstance(m, Flag)}


# Called after a device field is added or removed (request.py follows VmSpec with these).
DEVICE_FIELD_HOOKS: list[Callable[[], None]] = []


def add_model_field(model: type[BaseModel], name: str, info: FieldInfo) -> None:
    """Give `model` and its subclasses the field `name` as if their class bodies declared it
    (a pydantic model's fields are fixed when its class is made: this is the one place that
    adds to them; the annotation is what subclasses made later inherit it by)."""
    model.__annotations__[name] = info.annotation
    for cls in (model, *_subclasses(model)):
        cls.__pydantic_fields__[name] = info
        cls.model_rebuild(force=True)


def remove_model_field(model: type[BaseModel], name: str) -> None:
    """Undo `add_model_field`."""
    model.__annotations__.pop(name, None)
    for cls in (model, *_subclasses(model)):
        cls.__pydantic_fields__.pop(name, None)
        cls.model_rebuild(force=True)


def _subclasses(model: type[BaseModel]) -> list[type[BaseModel]]:
    out = []
    for sub in model.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def add_device_field(name: str, annotation: Any, flag: Flag, default: Any = None) -> None:
    """Add a device's field to VmSpec from outside this file, as if VmSpec declared
    `name: Annotated[annotation, flag] = default` (a device a test or a plugin defines; the
    board's devices declare theirs in VmSpec).  The request model, the flags and the API
    model follow; an API app made earlier keeps the schema it was made with."""
    if name in VmSpec.model_fields:
        raise ValueError(f"VmSpec has a field {name!r} already")
    declared: Any = Annotated[annotation, flag]
    add_model_field(VmSpec, name, FieldInfo.from_annotated_attribute(declared, default))
    for hook in DEVICE_FIELD_HOOKS:
        hook()


def remove_device_field(name: str) -> None:
    """Undo `add_device_field`."""
    if name not in device_flags():
        raise ValueError(f"VmSpec has no device field {name!r}")
    remove_model_field(VmSpec, name)
    for hook in DEVICE_FIELD_HOOKS:
        hook()


# the `pyvirt run` flag of each VmSpec field, for messages (device fields: their Flag's)
FLAGS = {"cpus": "--cpus", "memory": "--memory", "kernel": "--kernel", "initrd": "--initrd",
         "append": "--append", "bios": "--bios", "disks": "--disk", "ports": "--vport", "nets": "--net",
         "shares": "--share", "engine": "--engine", "mmu": "--mmu", "rng": "--no-rng"}
SIZE_FIELDS = ("memory",)


def flag_of(field: str) -> str:
    """The flag that sets VmSpec field `field` (the field's name when none does)."""
    device = device_flags().get(field)
    return device.flags[0] if device is not None else FLAGS.get(field, field)


def limit_message(err: dict[str, object], size: bool = False) -> str:
    """A pydantic error's message in the user's words: 'at most 64G', 'at least 1'."""
    ctx = err.get("ctx") or {}
    assert isinstance(ctx, dict)
    for key, words in (("le", "at most"), ("ge", "at least"), ("lt", "must be less than"),
                       ("gt", "must be more than")):
        if key in ctx:
            bound = ctx[key]
            return f"{words} {format_size(int(bound)) if size else format(bound, 'g')}"
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


def make_spec(typed: dict[str, str] | None = None, **fields: object) -> VmSpec:
    """Build a VmSpec, turning validation errors into one-line ConfigErrors in the words of
    `pyvirt run`'s flags (`typed`: a field's value as the user wrote it, e.g. {"memory": "64G"})."""
    try:
        return VmSpec(**fields)  # type: ignore[arg-type]
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting {field!r}") from None
        flag = flag_of(field) if field else "the VM"
        value = (typed or {}).get(field)
        if value is None and isinstance(fields.get(field), (int, str)) and not isinstance(fields.get(field), bool):
            raw = fields[field]
            value = format_size(raw) if field in SIZE_FIELDS and isinstance(raw, int) else str(raw)
        what = f"{flag} {value}" if value is not None else flag
        raise ConfigError(f"{what}: {limit_message(dict(err), size=field in SIZE_FIELDS)}") from None
