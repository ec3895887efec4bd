"""pyvirt: a virtual machine system written in Python.

The software engine emulates a RISC-V 64-bit "virt" computer (RV64GC harts,
PLIC, CLINT, 16550A UART, virtio-mmio devices) that boots unmodified Linux.
"""

from pyvirt.errors import ConfigError, GuestMemoryError, ImageError, PyvirtError
from pyvirt.version import __version__

__all__ = ["Client", "VmRequest", "ConfigError", "GuestMemoryError", "ImageError", "PyvirtError", "__version__"]


def __getattr__(name: str) -> object:
    # pyvirt.Client (pyvirtd's API client) is imported on first use: httpx stays out of
    # `pyvirt run`'s start-up.
    if name == "Client":
        from pyvirt.host.client import Client
        return Client
    if name == "VmRequest":                # what Client.create sends: a VM as pyvirt run's flags say it
        from pyvirt.request import VmRequest
        return VmRequest
    raise AttributeError(f"module 'pyvirt' has no attribute {name!r}")
