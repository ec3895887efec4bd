"""The API's request models and their mapping onto the one VmSpec.

`VmCreate` is what POST /vms takes; `to_spec()` turns it into the same
validated `VmSpec` that `pyvirt run` builds from its flags (disks and nets in
the --disk/--net syntax), plus the host limits that are not part of a VM's
hardware (CPU quota, memory ceiling).  Errors are one-line ConfigErrors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pyvirt.errors import ConfigError
from pyvirt.spec import MIB, DiskSpec, NetSpec, VmSpec, make_spec, parse_size

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
NAME_RULE = "a VM name is 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
VMM_OVERHEAD = 256 * MIB        # the default memory ceiling: guest RAM + this for the VMM itself
MIN_MEMORY_LIMIT = 64 * MIB


class VmCreate(BaseModel):
    """A new VM.  Without `kernel` it runs the default guest (lean Linux + busybox); with
    `command` its /init runs that shell command and powers off with its exit status."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE, description="unique; letters, digits, '.', '_', '-' (1-63)")
    cpus: int = Field(1, ge=1, le=8, description="harts")
    memory: int | str = Field("256M", description="guest RAM: bytes, or a size such as 256M")
    kernel: str | None = Field(None, description="Linux Image (default: the default guest's)")
    initrd: str | None = None
    append: str | None = Field(None, description="kernel command line")
    disks: list[str] = Field(default_factory=list, description="PATH[,ro][,format=raw|qcow2][,bw=RATE][,iops=N][,burst=SIZE] (as --disk)")
    nets: list[str] = Field(default_factory=list,
                            description="user[,port=H:G][,host-loopback=on]|stream=SOCK|network=NAME|tap=IF[,mac=M][,bw=|tx_bw=|rx_bw=RATE] (as --net)")
    command: str | None = Field(None, description="shell command for the default guest's /init")
    engine: Literal["interp", "jit", "native"] | None = None
    cpu_quota: float | None = Field(None, gt=0, le=64,
                                       description="CPU time ceiling in CPUs (0.5: half of one CPU)")
    memory_limit: int | str | None = Field(
        None, description="the runner's memory ceiling (default: memory + 256M for the VMM)")


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="the archive to write (.pyvirt / .tar.zst); must not exist")
    snapshot: str | None = Field(None, description="export the VM as of this snapshot of it, with the snapshot")


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="an archive written by export")
    name: str | None = Field(None, pattern=NAME_RE, description="the new VM's name (default: the archive's)")
    nets: list[str] = Field(default_factory=list,
                            description="the imported VM's network interfaces, as --net (the archive's own "
                                        "are never used; a snapshot in it needs as many as it saved)")
    cpu_quota: float | None = Field(None, gt=0, le=64, description="CPU time ceiling in CPUs")
    memory_limit: int | str | None = Field(
        None, description="the runner's memory ceiling (default: the archive's memory + 256M); an "
                          "archive whose guest RAM does not fit under it is refused")


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpu_quota: float | None = None
    memory_limit: int


def _existing(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    return p.absolute()


def _size(value: int | str, what: str) -> int:
    try:
        return parse_size(value)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None


def to_spec(req: VmCreate) -> tuple[VmSpec, Limits]:
    """The VmSpec and host limits for `req` (ConfigError when something is wrong)."""
    from pyvirt.engines import default_engine
    from pyvirt.guestcmd import command_append

    memory = _size(req.memory, "memory")
    kernel = _existing(req.kernel, "kernel") if req.kernel else None
    initrd = _existing(req.initrd, "initrd") if req.initrd else None
    append = req.append
    if kernel is None:
        from pyvirt.images import cached_default_image
        img = cached_default_image()
        if img is None:
            raise ConfigError("the default guest is not built: run `pyvirt image build` (or give a kernel)")
        kernel, initrd = img.kernel, initrd or img.initrd
        append = img.cmdline if append is None else append
    elif req.command is not None and append is None:
        append = "console=ttyS0"
    if req.command is not None:
        append = command_append(append, req.command, what="command")
    disks = [DiskSpec.parse(d) for d in req.disks]
    for d in disks:
        _existing(str(d.path), "disk")
        d.path = d.path.expanduser().absolute()
    nets: list[NetSpec] = [NetSpec.parse(n) for n in req.nets]
    spec = make_spec(cpus=req.cpus, memory=memory, kernel=kernel, initrd=initrd, append=append,
                     disks=disks, nets=nets, engine=req.engine or default_engine())
    return spec, host_limits(spec, req.memory_limit, req.cpu_quota)


def host_limits(spec: VmSpec, memory_limit: int | str | None, cpu_quota: float | None) -> Limits:
    """The host limits of a VM with `spec` as its user asked for them (ConfigError when they
    do not fit the VM)."""
    if memory_limit is not None:
        limit = _size(memory_limit, "memory_limit")
        if limit < spec.memory + MIN_MEMORY_LIMIT:
            raise ConfigError(f"memory_limit {limit} is too small for {spec.memory >> 20} MiB of guest "
                              f"RAM (at least memory + {MIN_MEMORY_LIMIT >> 20} MiB)")
    else:
        limit = spec.memory + VMM_OVERHEAD
    if cpu_quota is not None and cpu_quota > spec.cpus:
        raise ConfigError(f"cpu_quota {cpu_quota} is more than the VM's {spec.cpus} cpu(s)")
    return Limits(cpu_quota=cpu_quota, memory_limit=limit)

