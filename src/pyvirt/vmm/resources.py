"""The VMM step that turns what a spec names on the host into opened backends.

The board (`machine/`) builds devices over backends it is handed (`HostBackends`); it
opens no file, socket or process and resolves no host name.  Here disk images are opened
(and locked), console ports bound, and NICs connected: network names (`--net
network=NAME`) resolve to the switch's socket, so `machine/` never imports `network/`
(the layers are checked by tests/repo/test_layers.py)."""

from __future__ import annotations

from typing import Any

from pyvirt.backends.char import CharBackend
from pyvirt.backends.disk import open_disk
from pyvirt.backends.net import NetBackend, PasstBackend, StreamBackend, TapBackend
from pyvirt.backends.vsock import UnixVsockBackend
from pyvirt.devices.virtio.console import UnixSocketPort
from pyvirt.machine.interface import HostBackends
from pyvirt.machine.riscv_virt import VirtBoard
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


def open_backends(spec: VmSpec) -> HostBackends:
    """The host side of every disk, console port, NIC and vsock the spec names, in that order (as
    the board attaches them); if one cannot be had, nothing stays open."""
    VirtBoard.check_devices(spec)
    opened = HostBackends()
    try:
        for disk in spec.disks:
            opened.disks.append(open_disk(disk.path, read_only=disk.read_only, fmt=disk.format))
        for p in spec.ports:
            port = UnixSocketPort(p.socket)
            if p.name == "hvc0":
                opened.console_port = port
            else:
                opened.named_ports.append((p.name, port))
        for net in spec.nets:
            opened.nets.append(open_net_backend(net))
        if spec.vsock is not None:
            opened.vsock = UnixVsockBackend(spec.vsock.socket)
    except BaseException:
        opened.close()
        raise
    return opened


def build_board(spec: VmSpec, console: CharBackend, **kwargs: Any) -> VirtBoard:
    """The board for `spec` over freshly opened host backends (`kwargs`: VirtBoard's)."""
    return VirtBoard(spec, console, host=open_backends(spec), **kwargs)
