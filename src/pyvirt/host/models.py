"""The API's request models and their mapping onto the one VmSpec.

`VmCreate` is what POST /vms takes: pyvirt/request.py's VmRequest (what `pyvirt run`
and `pyvirt create` build from their flags) plus a name; `to_spec()` resolves it with
request.resolve, as `pyvirt run` does, and adds the host limits that are not part of a
VM's hardware (CPU quota, memory ceiling).  Errors are one-line ConfigErrors.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pyvirt.errors import ConfigError
from pyvirt.request import VmRequest
from pyvirt.spec import MIB, VmSpec, format_size, parse_size

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
NAME_RULE = "a VM name is 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
SNAPSHOT_NAME_RULE = ("a snapshot name is 1 to 63 letters, digits, '.', '_' or '-', starting with a letter "
                      "or digit")
VMM_OVERHEAD = 256 * MIB        # the default memory ceiling: guest RAM + this for the VMM itself
MIN_MEMORY_LIMIT = 64 * MIB


class VmCreate(VmRequest):
    """A new VM: the one VM request (pyvirt/request.py, what `pyvirt run` takes too) and a name."""

    name: str = Field(pattern=NAME_RE, description="unique; letters, digits, '.', '_', '-' (1-63)")


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


def _size(value: int | str, what: str) -> int:
    try:
        return parse_size(value)
    except ConfigError:
        raise ConfigError(f"{what} {value}: expected a size such as 256M or 1G") from None


def to_spec(req: VmCreate) -> tuple[VmSpec, Limits]:
    """The VmSpec (request.resolve, as for `pyvirt run`) and host limits for `req`
    (ConfigError when something is wrong)."""
    from pyvirt.request import resolve

    got = resolve(req, daemon=True)
    return got.spec, host_limits(got.spec, req.memory_limit, req.cpu_quota, got.memory_typed)


def host_limits(spec: VmSpec, memory_limit: int | str | None, cpu_quota: float | None,
                typed_memory: str | None = None) -> Limits:
    """The host limits of a VM with `spec` as its user asked for them (ConfigError when they
    do not fit the VM)."""
    if memory_limit is not None:
        limit = _size(memory_limit, "memory_limit")
        if limit < spec.memory + MIN_MEMORY_LIMIT:
            typed_limit = memory_limit if isinstance(memory_limit, str) else format_size(limit)
            raise ConfigError(f"memory_limit {typed_limit}: too small for "
                              f"{typed_memory or format_size(spec.memory)} of guest RAM "
                              f"(at least memory + {format_size(MIN_MEMORY_LIMIT)}: "
                              f"{format_size(spec.memory + MIN_MEMORY_LIMIT)})")
    else:
        limit = spec.memory + VMM_OVERHEAD
    if cpu_quota is not None and cpu_quota > spec.cpus:
        raise ConfigError(f"cpu_quota {cpu_quota:g}: more than the VM's {spec.cpus} cpu(s)")
    return Limits(cpu_quota=cpu_quota, memory_limit=limit)


