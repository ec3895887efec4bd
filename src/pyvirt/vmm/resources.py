"""The VMM step that turns what a spec names on the host into opened backends.

The board (`machine/`) builds devices over backends it is handed (`HostBackends`); it
opens no file, socket or process and resolves no host name.  Here disk images are opened
(and locked), console ports bound, shared folders' virtiofsd started, and NICs connected: network names (`--net
network=NAME`) resolve to the switch's socket, so `machine/` never imports `network/`
(the layers are checked by tests/repo/test_layers.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyvirt.backends.char import CharBackend
from pyvirt.backends.net import NetBackend, PasstBackend, StreamBackend, TapBackend
from pyvirt.machine.interface import HostBackends
from pyvirt.machine.riscv_virt import VirtBoard
from pyvirt.machine.virtio_table import VIRTIO_KINDS
from pyvirt.network.manage import network_socket
from pyvirt.spec import NetSpec, VmSpec


def open_net_backend(net: NetSpec) -> NetBackend:
    """The host side a NetSpec asks for (ConfigError if it cannot be had)."""
    if net.backend == "stream":
        assert net.socket is not None
        return StreamBackend.connect(net.socket)
    if net.backend == "network":
        assert net.network is not None
        return StreamBackend.connect(network_socket(net.network))
    if net.backend == "tap":
        assert net.ifname is not None
        return TapBackend(net.ifname)
    return PasstBackend(net.ports, host_loopback=net.host_loopback)


# Openers of host sides that need this layer (a NIC's network name resolves through network/);
# the other kinds open with their row's `open` (machine/virtio_table.py).
OPENERS: dict[str, Callable[[VmSpec, int], Any]] = {"net": lambda spec, i: open_net_backend(spec.nets[i])}


def open_backends(spec: VmSpec) -> HostBackends:
    """The host side of every virtio device the spec names, kind by kind in the board's slot
    order (machine/virtio_table.py); if one cannot be had, nothing stays open."""
    VirtBoard.check_devices(spec)
    opened = HostBackends()
    try:
        for kind in VIRTIO_KINDS:
            open_ = OPENERS.get(kind.name, kind.open)
            if open_ is None:
                continue
            for i in range(kind.count(spec)):
                opened.of(kind.name).append(open_(spec, i))
    except BaseException:
        opened.close()
        raise
    return opened


def build_board(spec: VmSpec, console: CharBackend, **kwargs: Any) -> VirtBoard:
    """The board for `spec` over freshly opened host backends (`kwargs`: VirtBoard's)."""
    return VirtBoard(spec, console, host=open_backends(spec), **kwargs)
