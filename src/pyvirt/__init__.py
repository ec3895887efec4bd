"""pyvirt: a virtual machine system written in Python.

The software engine emulates a RISC-V 64-bit "virt" computer (RV64GC harts,
PLIC, CLINT, 16550A UART, virtio-mmio devices) that boots unmodified Linux.
"""

from pyvirt.errors import ConfigError, GuestMemoryError, ImageError, PyvirtError

__all__ = ["ConfigError", "GuestMemoryError", "ImageError", "PyvirtError", "__version__"]

__version__ = "0.1.0"
