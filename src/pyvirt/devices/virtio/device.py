"""The transport-independent part of a virtio device (virtio 1.2, chapters 2 and 3).

Device status state machine (2.1)::

    0 (reset) -> ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK (live)
                                    \\-> FAILED            \\-> DEVICE_NEEDS_RESET
                                                               (the device found the
                                                                driver broke the rules)

A device subclass names its id, offers features, exposes its configuration
space and handles its queues in `process(index, queue)`.  It never sees the
transport's registers.
"""

from __future__ import annotations

from typing import Any

from pyvirt.devices.virtio.queue import SplitQueue
from pyvirt.memory import Bus

VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128


class VirtioDevice:
    device_id = 0
    num_queues = 1
    queue_size = SplitQueue.MAX_SIZE

    def __init__(self) -> None:
        self.driver_features = 0

    def features(self) -> int:
        """Feature bits offered; subclasses add their own to these."""
        return VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC

    def config(self) -> bytes:
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, bus: Bus) -> None:
        self.bus = bus

    def reset(self) -> None:
        self.driver_features = 0

    def process(self, index: int, queue: SplitQueue) -> bool:
        """Serve available requests on queue `index`; True if an interrupt is due."""
        raise NotImplementedError

    def save(self) -> dict[str, Any]:
        return {"driver_features": self.driver_features}

    def load(self, state: dict[str, Any]) -> None:
        self.driver_features = state["driver_features"]
