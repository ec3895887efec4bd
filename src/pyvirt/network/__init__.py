"""Virtual networks between VMs: `pyvirt network create NAME` starts a learning switch.

Each network is one switch process serving one Unix stream socket
(`<runtime>/networks/<NAME>.sock`) with QEMU's `-netdev stream` framing, so
pyvirt VMs (`--net network=NAME` or `--net stream=SOCK`) and QEMU VMs
(`-netdev stream,server=off,addr.type=unix,addr.path=SOCK`) can join it.
Networks are isolated: nothing connects one network to another or to the host.
"""

from pyvirt.network.manage import (
    NetworkInfo,
    create_network,
    list_networks,
    network_socket,
    remove_network,
    runtime_dir,
)

__all__ = ["NetworkInfo", "create_network", "list_networks", "network_socket", "remove_network",
           "runtime_dir"]
