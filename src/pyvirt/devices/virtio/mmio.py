"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2)."""

from __future__ import annotations

import logging
from typing import Any

from pyvirt.devices.base import IrqLine
from pyvirt.devices.virtio.device import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VirtioDevice,
)
from pyvirt.devices.virtio.queue import QueueError, SplitQueue
from pyvirt.memory import Bus

log = logging.getLogger(__name__)

MAGIC = 0x74726976          # "virt"
VERSION = 2
VENDOR_ID = 0x50595654      # "PYVT"
INT_USED, INT_CONFIG = 1, 2

(MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR, DEVICE_FEATURES, DEVICE_FEATURES_SEL,
 DRIVER_FEATURES, DRIVER_FEATURES_SEL, QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY,
 QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK, STATUS, QUEUE_DESC_LOW, QUEUE_DESC_HIGH,
 QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, SHM_SEL,
 CONFIG_GENERATION, CONFIG) = (
    0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044,
    0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0AC, 0x0FC, 0x100)


class VirtioMmio:
    SIZE = 0x1000

    def __init__(self, device: VirtioDevice, bus: Bus, irq: IrqLine) -> None:
        self.device = device
        self.bus = bus
        self.irq = irq
        self.queues = [SplitQueue(bus, device.queue_size) for _ in range(device.num_queues)]
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.dev_features_sel = 0
        self.drv_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()
        self.device.reset()
        self.irq.set(False)

    # -- helpers -----------------------------------------------------------------
    def _queue(self) -> SplitQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _raise(self, bits: int) -> None:
        self.interrupt_status |= bits
        self.irq.set(True)

    def needs_reset(self, why: str) -> None:
        """The driver broke the rules: stop and ask for a reset (2.1.2)."""
        log.warning("virtio device %d: %s; device needs reset", self.device.device_id, why)
        if self.status & STATUS_DRIVER_OK:
            self.status |= STATUS_DEVICE_NEEDS_RESET
            self._raise(INT_CONFIG)

    def notify(self, index: int) -> None:
        if index >= len(self.queues) or not self.status & STATUS_DRIVER_OK:
            return
        if self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        try:
            if self.device.process(index, self.queues[index]):
                self._raise(INT_USED)
        except QueueError as e:
            self.needs_reset(str(e))

    # -- registers ------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            cfg = self.device.config()
            off = offset - CONFIG
            if off + size > len(cfg):
                return 0
            return int.from_bytes(cfg[off:off + size], "little")
        if size != 4:
            return 0
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return (self.device.features() >> (32 * self.dev_features_sel)) & 0xFFFFFFFF \
                if self.dev_features_sel < 2 else 0
        q = self._queue()
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset == 0x0B0 or offset == 0x0B4:          # SHMLen: no shared memory regions
            return 0xFFFFFFFF
        if offset in (0x0B8, 0x0BC):
            return 0xFFFFFFFF
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            self.device.config_write(offset - CONFIG, value.to_bytes(size, "little"))
            return
        if size != 4:
            return
        q = self._queue()
        if offset == DEVICE_FEATURES_SEL:
            self.dev_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.drv_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.drv_features_sel < 2 and not self.status & STATUS_FEATURES_OK:
                shift = 32 * self.drv_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NUM:
            if q and not q.ready:
                q.size = value
        elif offset == QUEUE_READY:
            if q:
                q.ready = bool(value & 1)
                q.event_idx = bool(self.driver_features & VIRTIO_F_EVENT_IDX)
        elif offset == QUEUE_NOTIFY:
            self.notify(value & 0xFFFF)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self.irq.set(self.interrupt_status != 0)
        elif offset == STATUS:
            self._set_status(value & 0xFF)
        elif q and not q.ready and offset in (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW,
                                              QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
            name = {QUEUE_DESC_LOW: "desc", QUEUE_DESC_HIGH: "desc", QUEUE_DRIVER_LOW: "avail",
                    QUEUE_DRIVER_HIGH: "avail", QUEUE_DEVICE_LOW: "used", QUEUE_DEVICE_HIGH: "used"}[offset]
            old = getattr(q, name)
            if offset in (QUEUE_DESC_LOW, QUEUE_DRIVER_LOW, QUEUE_DEVICE_LOW):
                setattr(q, name, (old & ~0xFFFFFFFF) | value)
            else:
                setattr(q, name, (old & 0xFFFFFFFF) | (value << 32))

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            offered = self.device.features()
            if self.driver_features & ~offered:
                value &= ~STATUS_FEATURES_OK       # the driver accepted features never offered
            else:
                self.device.driver_features = self.driver_features
        if value & STATUS_DRIVER_OK and not self.status & STATUS_DRIVER_OK:
            self.device.activate(self.bus)
        self.status = value | (self.status & STATUS_DEVICE_NEEDS_RESET)

    # -- state -----------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        return {"status": self.status, "driver_features": self.driver_features,
                "queue_sel": self.queue_sel, "interrupt_status": self.interrupt_status,
                "queues": [q.save() for q in self.queues], "device": self.device.save()}

    def load(self, state: dict[str, Any]) -> None:
        self.status = state["status"]
        self.driver_features = state["driver_features"]
        self.queue_sel = state["queue_sel"]
        self.interrupt_status = state["interrupt_status"]
        for q, s in zip(self.queues, state["queues"], strict=True):
            q.load(s)
        self.device.load(state["device"])
        if self.status & STATUS_DRIVER_OK:
            self.device.activate(self.bus)
        self.irq.set(self.interrupt_status != 0)
