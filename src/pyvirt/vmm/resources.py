"""The VMM step that turns what a spec names on the host into opened backends.

The board (`machine/`) builds devices; it does not resolve names of host things.  Network
names (`--net network=NAME`) resolve here, to the switch's socket, so `machine/` never imports
`network/` (the layers are checked by tests/repo/test_layers.py)."""

from __future__ import annotations

from pyvirt.backends.net import NetBackend, PasstBackend, StreamBackend, TapBackend
from pyvirt.network.manage import network_socket
from pyvirt.spec import NetSpec


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
    return PasstBackend(net.ports)
