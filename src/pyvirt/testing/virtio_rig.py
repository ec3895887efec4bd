"""A bus with RAM and one virtio-mmio device mapped, driven by the mock driver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyvirt.devices.base import IrqLine
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.mmio import VirtioMmio
from pyvirt.memory import Bus
from pyvirt.testing.virtq import MockVirtioDriver

RAM = 0x8000_0000
RAM_SIZE = 4 << 20
MMIO = 0x1000_1000


class GuardedBus(Bus):
    """A Bus that records every access outside RAM other than the device's registers."""

    def __init__(self, ram_base: int, ram_size: int) -> None:
        super().__init__(ram_base, ram_size)
        self.stray: list[tuple[str, int, int]] = []

    def _guard(self, what: str, addr: int, length: int) -> None:
        if not self.is_ram(addr, length) and not (MMIO <= addr and addr + length <= MMIO + 0x1000):
            self.stray.append((what, addr, length))

    def read(self, addr: int, size: int) -> int:
        self._guard("read", addr, size)
        return super().read(addr, size)

    def write(self, addr: int, size: int, value: int) -> None:
        self._guard("write", addr, size)
        super().write(addr, size, value)

    def view(self, addr: int, length: int) -> memoryview:
        self._guard("view", addr, length)
        return super().view(addr, length)

    def read_bytes(self, addr: int, length: int) -> bytes:
        self._guard("read_bytes", addr, length)
        return super().read_bytes(addr, length)

    def write_bytes(self, addr: int, data: Any) -> None:
        self._guard("write_bytes", addr, len(data))
        super().write_bytes(addr, data)


@dataclass
class Rig:
    bus: GuardedBus
    irq: IrqLine
    mmio: VirtioMmio
    device: Any
    drv: MockVirtioDriver


def make_rig(device: VirtioDevice, ram_size: int = RAM_SIZE) -> Rig:
    bus = GuardedBus(RAM, ram_size)
    irq = IrqLine()
    mmio = VirtioMmio(device, bus, irq)
    bus.add_mmio(MMIO, VirtioMmio.SIZE, mmio, "virtio0")
    return Rig(bus, irq, mmio, device, MockVirtioDriver(bus, MMIO))
