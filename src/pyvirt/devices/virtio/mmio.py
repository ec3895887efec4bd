"""The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2 "MMIO Device Register Layout").

    0x000 MagicValue          R   0x74726976 ("virt")
    0x004 Version             R   2
    0x008 DeviceID            R
    0x00c VendorID            R
    0x010 DeviceFeatures      R   32 bits selected by DeviceFeaturesSel
    0x014 DeviceFeaturesSel   W
    0x020 DriverFeatures      W   32 bits selected by DriverFeaturesSel
    0x024 DriverFeaturesSel   W
    0x030 QueueSel            W
    0x034 QueueNumMax         R   0 if the selected queue does not exist
    0x038 QueueNum            W
    0x044 QueueReady          RW
    0x050 QueueNotify         W   the queue index
    0x060 InterruptStatus     R   bit 0 used buffer, bit 1 configuration change
    0x064 InterruptACK        W
    0x070 Status              RW  0 resets the device
    0x080/0x084 QueueDescLow/High       W
    0x090/0x094 QueueDriverLow/High     W   (available ring)
    0x0a0/0x0a4 QueueDeviceLow/High     W   (used ring)
    0x0ac SHMSel              W
    0x0b0/0x0b4 SHMLenLow/High          R   -1: no shared memory regions
    0x0b8/0x0bc SHMBaseLow/High         R   -1
    0x0fc ConfigGeneration    R
    0x100+ Config             RW  device-specific configuration space

Control registers take 32-bit aligned accesses only (4.2.2.2); other widths
are ignored.  The queue registers apply to the queue selected by QueueSel and
are ignored while that queue is ready (4.2.2.2: the driver "MUST NOT write"
them then).  The interrupt line is high while InterruptStatus is non-zero.
"""

from __future__ import annotations

from typing import Any

from pyvirt.devices.base import IrqLine
from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.memory import Bus
from pyvirt.state import U32, Schema, integer, record

MAGIC = 0x74726976          # "virt"
VERSION = 2
VENDOR_ID = 0x50595654      # "PYVT"

MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

INT_USED, INT_CONFIG = 1, 2

_QUEUE_ADDRS = {QUEUE_DESC_LOW: ("desc", 0), QUEUE_DESC_HIGH: ("desc", 32),
                QUEUE_DRIVER_LOW: ("avail", 0), QUEUE_DRIVER_HIGH: ("avail", 32),
                QUEUE_DEVICE_LOW: ("used", 0), QUEUE_DEVICE_HIGH: ("used", 32)}


class VirtioMmio:
    """One virtio-mmio window (0x1000 bytes) in front of a `VirtioDevice`."""

    SIZE = 0x1000

    def __init__(self, device: VirtioDevice, bus: Bus, irq: IrqLine) -> None:
        self.device = device
        self.bus = bus
        self.irq = irq
        device.attach(bus, self._raise)
        self.reset()

    def reset(self) -> None:
        """Machine reset (and a driver writing 0 to Status)."""
        self.dev_features_sel = 0
        self.drv_features_sel = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.interrupt_status = 0
        self.device.reset()
        self.irq.set(False)

    @property
    def status(self) -> int:
        return self.device.status

    def _raise(self, bits: int) -> None:
        self.interrupt_status |= bits
        self.irq.set(True)

    # -- registers --------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        dev = self.device
        if offset >= CONFIG:
            return dev.read_config(offset - CONFIG, size)
        if size != 4 or offset & 3:
            return 0
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return dev.device_id
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return dev.device_features_word(self.dev_features_sel)
        if offset == QUEUE_NUM_MAX:
            return dev.queues[self.queue_sel].max_size if self.queue_sel < len(dev.queues) else 0
        if offset == QUEUE_READY:
            return int(dev.queues[self.queue_sel].ready) if self.queue_sel < len(dev.queues) else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return dev.status
        if offset == CONFIG_GENERATION:
            return dev.config_generation
        if SHM_LEN_LOW <= offset <= SHM_BASE_HIGH:
            return 0xFFFF_FFFF                      # no shared memory region SHMSel
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        dev = self.device
        if offset >= CONFIG:
            if size in (1, 2, 4, 8):
                dev.write_config(offset - CONFIG, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            return
        if size != 4 or offset & 3:
            return
        value &= 0xFFFF_FFFF
        if offset == QUEUE_NOTIFY:
            dev.notify(value & 0xFFFF)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self.irq.set(self.interrupt_status != 0)
        elif offset == STATUS:
            if value == 0:
                self.reset()
            else:
                dev.set_status(value)
        elif offset == DEVICE_FEATURES_SEL:
            self.dev_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.drv_features_sel = value
        elif offset == DRIVER_FEATURES:
            dev.set_driver_features_word(self.drv_features_sel, value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == SHM_SEL:
            self.shm_sel = value
        elif offset in (QUEUE_NUM, QUEUE_READY) or offset in _QUEUE_ADDRS:
            self._write_queue(offset, value)

    def _write_queue(self, offset: int, value: int) -> None:
        dev = self.device
        if self.queue_sel >= len(dev.queues):
            return
        q = dev.queues[self.queue_sel]
        if offset == QUEUE_READY:
            if bool(value & 1) != q.ready:
                dev.queue_ready(self.queue_sel, bool(value & 1))
            return
        if q.ready:
            return
        if offset == QUEUE_NUM:
            q.size = value
            return
        name, shift = _QUEUE_ADDRS[offset]
        old = getattr(q, name)
        setattr(q, name, (old & ~(0xFFFF_FFFF << shift)) | (value << shift))

    # -- state --------------------------------------------------------------------------------
    def state_schema(self) -> Schema:
        """What `load()` accepts (checked before it runs; pyvirt/state.py)."""
        return record({"dev_features_sel": U32, "drv_features_sel": U32, "queue_sel": U32,
                       "shm_sel": U32, "interrupt_status": integer(0, 3),
                       "device": self.device.state_schema()})

    def save(self) -> dict[str, Any]:
        return {"dev_features_sel": self.dev_features_sel, "drv_features_sel": self.drv_features_sel,
                "queue_sel": self.queue_sel, "shm_sel": self.shm_sel,
                "interrupt_status": self.interrupt_status, "device": self.device.save()}

    def load(self, state: dict[str, Any]) -> None:
        self.dev_features_sel = state["dev_features_sel"]
        self.drv_features_sel = state["drv_features_sel"]
        self.queue_sel = state["queue_sel"]
        self.shm_sel = state["shm_sel"]
        self.interrupt_status = state["interrupt_status"]
        self.device.load(state["device"])
        self.irq.set(self.interrupt_status != 0)
