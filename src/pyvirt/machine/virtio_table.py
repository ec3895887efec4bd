"""The virtio devices of the virt board, one row per kind, in slot order (virtio-mmio slot i
is device i of the rows taken in turn: disks first, then rng, console, NICs, vsock, shares).

Each row says how many devices of its kind a spec asks for, how the VMM opens the host side
of one (`open`: called by `vmm/resources.py` before the board is built; None: no host side,
or opened there because it needs the layers above -- a NIC's network name), and how the board
makes the device over it (`make`).  The board (`VirtBoard._build_devices`), its slot count,
the VMM's opening of backends, the device tree (one virtio-mmio node per slot) and the
snapshot state schema (each device's `state_schema()`, by slot) all read this table.

A new virtio device is four files (docs/devices.md, "Adding a virtio device"): its device
file, its backend, a row here and its VmSpec field in spec.py, which carries its flag
(`Annotated[..., Flag(...)]`): the `pyvirt run`/`pyvirt create` flag, the request and API
field and their resolution to the spec come from that Flag (request.py edits nothing).  A
device defined outside src (a test's, a plugin's) adds its row with `register` and its field
with `spec.add_device_field` (tests/machine/test_add_device.py does both)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvirt.clock import Clock
from pyvirt.devices.virtio.blk import VirtioBlk
from pyvirt.devices.virtio.console import UnixSocketPort, VirtioConsole
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.fs import VirtioFs
from pyvirt.devices.virtio.net import VirtioNet, parse_mac
from pyvirt.devices.virtio.rng import VirtioRng
from pyvirt.devices.virtio.vsock import NullVsockBackend, VirtioVsock
from pyvirt.machine.interface import ConsolePorts
from pyvirt.ratelimit import RateLimiter
from pyvirt.spec import VmSpec


@dataclass(frozen=True)
class VirtioKind:
    name: str                                                  # HostBackends' key
    count: Callable[[VmSpec], int]                             # devices of this kind in the spec
    make: Callable[[Clock, VmSpec, int, Any], VirtioDevice]    # device i over its host backend
    open: Callable[[VmSpec, int], Any] | None = None           # device i's host backend


def _open_disk(spec: VmSpec, i: int) -> Any:
    from pyvirt.backends.disk import open_disk
    disk = spec.disks[i]
    return open_disk(disk.path, read_only=disk.read_only, fmt=disk.format)


def _make_blk(clock: Clock, spec: VmSpec, i: int, backend: Any) -> VirtioDevice:
    disk = spec.disks[i]
    return VirtioBlk(backend, serial=f"pyvirt-disk{i}", limiter=RateLimiter.build(clock, disk.bw, disk.iops, disk.burst))


def _open_ports(spec: VmSpec, _i: int) -> ConsolePorts:
    ports = ConsolePorts()
    try:
        for p in spec.ports:
            port = UnixSocketPort(p.socket)
            if p.name == "hvc0":
                ports.console_port = port
            else:
                ports.named_ports.append((p.name, port))
    except BaseException:
        ports.close()
        raise
    return ports


def _make_console(_clock: Clock, _spec: VmSpec, _i: int, ports: ConsolePorts) -> VirtioDevice:
    return VirtioConsole(ports.console_port, ports.named_ports)


def _make_net(clock: Clock, spec: VmSpec, i: int, backend: Any) -> VirtioDevice:
    net = spec.nets[i]
    return VirtioNet(backend, parse_mac(net.mac), RateLimiter.build(clock, net.tx_bw),
                     RateLimiter.build(clock, net.rx_bw))


def _open_vsock(spec: VmSpec, _i: int) -> Any:
    from pyvirt.backends.vsock import UnixVsockBackend
    assert spec.vsock is not None
    return UnixVsockBackend(spec.vsock.socket)


def _make_vsock(clock: Clock, spec: VmSpec, _i: int, backend: Any) -> VirtioDevice:
    assert spec.vsock is not None
    return VirtioVsock(backend or NullVsockBackend(), spec.vsock.cid, ticks=clock.ticks)


def _open_share(spec: VmSpec, i: int) -> Any:
    from pyvirt.backends.virtiofsd import Virtiofsd
    share = spec.shares[i]
    return Virtiofsd(share.path, share.tag, share.read_only)


def _make_fs(_clock: Clock, spec: VmSpec, i: int, fsd: Any) -> VirtioDevice:
    assert fsd.front is not None
    return VirtioFs(fsd.front, spec.shares[i].tag)      # (guest RAM's memfd: the bus's)


VIRTIO_KINDS: list[VirtioKind] = [
    VirtioKind("blk", lambda s: len(s.disks), _make_blk, _open_disk),
    VirtioKind("rng", lambda s: int(s.rng), lambda _c, _s, _i, _b: VirtioRng()),
    VirtioKind("console", lambda s: int(bool(s.ports)), _make_console, _open_ports),
    VirtioKind("net", lambda s: len(s.nets), _make_net),       # (opened by vmm/resources: network names)
    VirtioKind("vsock", lambda s: int(s.vsock is not None), _make_vsock, _open_vsock),
    VirtioKind("fs", lambda s: len(s.shares), _make_fs, _open_share),
]


def register(kind: VirtioKind) -> Callable[[], None]:
    """Add a row after the others (its devices take the slots after the shares') for a device
    defined outside this file; returns what removes it again."""
    if any(k.name == kind.name for k in VIRTIO_KINDS):
        raise ValueError(f"a virtio kind {kind.name!r} is in the table already")
    VIRTIO_KINDS.append(kind)
    return lambda: VIRTIO_KINDS.remove(kind)
