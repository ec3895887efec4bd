"""The transport-independent part of a virtio device (virtio 1.2, chapters 2 and 3).

Device status (2.1), set by the driver bit by bit during initialisation
(3.1.1), with DEVICE_NEEDS_RESET set by the device::

        write 0 (reset) from any state
              |
              v
        0 --> ACKNOWLEDGE --> DRIVER --> FEATURES_OK ------> DRIVER_OK (live)
                                 |        refused (bit not        |
                                 |        kept) when the driver   | driver broke a
                                 |        accepted features never | queue's rules
                                 |        offered, or not         v
                                 |        VERSION_1         DEVICE_NEEDS_RESET
                                 v                          (stops; config-change
                               FAILED (driver gave up)       interrupt)

ACKNOWLEDGE (1)         "the guest OS has found the device and recognized it"
DRIVER (2)              "the guest OS knows how to drive the device"
FEATURES_OK (8)         "the driver has acknowledged all the features it understands,
                         and feature negotiation is complete"
DRIVER_OK (4)           "the driver is set up and ready to drive the device"
DEVICE_NEEDS_RESET (64) "the device has experienced an error from which it can't
                         recover"
FAILED (128)            "something went wrong in the guest, and it has given up"

A write that clears a bit the device holds (other than writing 0) breaks
2.1.1's "driver MUST NOT clear a device status bit" and is ignored.

A device subclass names its id, offers features, exposes its configuration
space and serves its queues in `process(index, queue)`.  It never sees the
transport's registers; the transport calls `attach()` with the bus and a
function that raises interrupt-status bits (`INT_USED`, `INT_CONFIG`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pyvirt.compat import zip_strict
from pyvirt.devices.virtio.queue import QueueError, SplitQueue
from pyvirt.memory import Bus
from pyvirt.state import U8, U32, U64, Schema, items, record, text

log = logging.getLogger(__name__)

# Reserved feature bits (6)
VIRTIO_F_INDIRECT_DESC = 1 << 28      # VIRTIO_RING_F_INDIRECT_DESC
VIRTIO_F_EVENT_IDX = 1 << 29          # VIRTIO_RING_F_EVENT_IDX
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = VIRTIO_F_INDIRECT_DESC
VIRTIO_RING_F_EVENT_IDX = VIRTIO_F_EVENT_IDX

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# Interrupt causes (the MMIO InterruptStatus bits and the PCI ISR bits alike)
INT_USED = 1       # "used buffer notification"
INT_CONFIG = 2     # "configuration change notification"


class VirtioDevice:
    """Base of all virtio device models."""

    device_id = 0
    num_queues = 1
    queue_max_size = SplitQueue.MAX_SIZE

    def __init__(self) -> None:
        self.queues = [SplitQueue(self.queue_max_size) for _ in range(self.num_queues)]
        self.bus: Bus | None = None
        self._interrupt: Callable[[int], None] = lambda bits: None
        self.status = 0
        self.driver_features = 0
        self.config_generation = 0
        self.needs_reset_reason = ""

    def attach(self, bus: Bus, interrupt: Callable[[int], None]) -> None:
        """Called once by the transport: guest memory and the interrupt to raise."""
        self.bus = bus
        self._interrupt = interrupt
        for q in self.queues:
            q.bus = bus

    # -- features (2.2) ------------------------------------------------------------------
    def features(self) -> int:
        """Feature bits offered; subclasses add theirs to these."""
        return VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC

    def device_features_word(self, sel: int) -> int:
        return (self.features() >> (32 * sel)) & 0xFFFF_FFFF if 0 <= sel < 2 else 0

    def set_driver_features_word(self, sel: int, value: int) -> None:
        """Features accepted by the driver; ignored once FEATURES_OK is set (3.1.1)."""
        if self.status & STATUS_FEATURES_OK or not 0 <= sel < 2:
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) \
            | ((value & 0xFFFF_FFFF) << shift)

    def negotiated(self, bit: int) -> bool:
        return bool(self.status & STATUS_FEATURES_OK and self.driver_features & bit)

    # -- host I/O: the lifecycle the board serves between CPU slices ----------------------
    # A device that serves host I/O (a backend to poll, descriptors that wake an idle VM, a
    # timer: `next_deadline` below) sets `serves_host`; the board polls those, and only
    # those, in one list.
    serves_host = False

    def poll(self) -> None:
        """Between CPU slices: move host I/O along."""

    def wait_fds(self) -> list[int]:
        """Host descriptors whose input should wake an idle VM."""
        return []

    # -- status (2.1, 3.1) ---------------------------------------------------------------
    @property
    def live(self) -> bool:
        """DRIVER_OK, not failed, not waiting for a reset: queues may be served."""
        return (self.status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED)
                == STATUS_DRIVER_OK)

    def set_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self.status
        driver_bits = old & ~STATUS_DEVICE_NEEDS_RESET
        value &= ~STATUS_DEVICE_NEEDS_RESET            # the device's bit, not the driver's
        if value & driver_bits != driver_bits:
            log.debug("virtio %d: driver cleared status bits (%#x -> %#x); ignored",
                      self.device_id, old, value)
            return
        new = value & ~driver_bits
        if new & STATUS_FEATURES_OK and not self._features_acceptable(value):
            value &= ~STATUS_FEATURES_OK               # refused: the driver will see it unset
        if new & STATUS_DRIVER_OK and not value & STATUS_FEATURES_OK:
            value &= ~STATUS_DRIVER_OK                 # live without negotiation: refused
        self.status = value | (old & STATUS_DEVICE_NEEDS_RESET)
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            self._go_live()

    def _features_acceptable(self, value: int) -> bool:
        drv, offered = self.driver_features, self.features()
        if drv & ~offered:
            log.debug("virtio %d: driver accepted features %#x never offered",
                      self.device_id, drv & ~offered)
            return False
        if not value & STATUS_DRIVER:
            return False
        return bool(drv & VIRTIO_F_VERSION_1)          # no legacy interface here

    def _go_live(self) -> None:
        for i, q in enumerate(self.queues):
            if q.ready and q.broken:
                self.needs_reset(f"queue {i}: {q.broken}")
                return
        try:
            self.activate()
        except Exception as e:                         # a device bug must not kill the VM
            log.exception("virtio %d: activation failed", self.device_id)
            self.needs_reset(f"activation failed: {e}")

    def needs_reset(self, why: str) -> None:
        """The device cannot go on: set DEVICE_NEEDS_RESET and tell the driver with a
        configuration-change notification (2.1.2, 4.2.3.3)."""
        if self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        log.warning("virtio device %d: %s; device needs reset", self.device_id, why)
        self.needs_reset_reason = why
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self._interrupt(INT_CONFIG)

    def reset(self) -> None:
        """Device reset (2.4): status, features and queues to their initial state."""
        self.status = 0
        self.driver_features = 0
        self.needs_reset_reason = ""
        for q in self.queues:
            q.reset()
        self.device_reset()

    # -- configuration space (2.5) -----------------------------------------------------------
    def config(self) -> bytes:
        """The device-specific configuration space, little-endian."""
        return b""

    def read_config(self, offset: int, size: int) -> int:
        cfg = self.config()
        if offset < 0 or offset + size > len(cfg):
            return 0
        return int.from_bytes(cfg[offset:offset + size], "little")

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space; read-only unless overridden."""

    def config_changed(self) -> None:
        """The configuration space changed (e.g. a resized disk): new generation and an
        interrupt once the driver is live (2.5.1)."""
        self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
        if self.status & STATUS_DRIVER_OK:
            self._interrupt(INT_CONFIG)

    # -- queues ---------------------------------------------------------------------------
    def queue_ready(self, index: int, ready: bool) -> None:
        """QueueReady written for queue `index` (by the transport)."""
        q = self.queues[index]
        if ready:
            q.enable(event_idx=bool(self.driver_features & VIRTIO_F_EVENT_IDX))
        else:
            q.disable()

    def notify(self, index: int) -> None:
        """The driver kicked queue `index`: serve it.  Never raises for guest input."""
        if not self.live or not 0 <= index < len(self.queues):
            return
        q = self.queues[index]
        if not q.ready:
            return
        try:
            if q.broken:
                raise QueueError(q.broken)
            self.process(index, q)
            q.publish_avail_event()
            if q.should_notify():
                self._interrupt(INT_USED)
        except QueueError as e:
            self.needs_reset(f"queue {index}: {e}")
        except Exception as e:                          # last line of defence
            log.exception("virtio %d: queue %d processing failed", self.device_id, index)
            self.needs_reset(f"queue {index}: internal error {e!r}")

    def signal_used(self, index: int) -> None:
        """After completing requests outside `notify()` (asynchronous I/O)."""
        q = self.queues[index]
        try:
            if self.live and q.should_notify():
                self._interrupt(INT_USED)
        except QueueError as e:
            self.needs_reset(f"queue {index}: {e}")

    # -- for subclasses -----------------------------------------------------------------------
    def process(self, index: int, queue: SplitQueue) -> None:
        """Take available chains from `queue` and put them on its used ring."""
        raise NotImplementedError

    def activate(self) -> None:
        """The driver set DRIVER_OK: start whatever the device needs."""

    def device_reset(self) -> None:
        """Reset device-specific state (status and queues are already reset)."""

    def next_deadline(self) -> int | None:
        """The clock tick at which the device's next timer fires (a rate limiter's refill),
        or None: the board's idle wait ends then."""
        return None

    def device_state_schema(self) -> Schema:
        """What `load_device()` accepts; a device that saves state of its own overrides
        this beside its `save_device()`/`load_device()` (pyvirt/state.py)."""
        return record({})

    def save_device(self) -> dict[str, Any]:
        return {}

    def load_device(self, state: dict[str, Any]) -> None:
        pass

    # -- state ----------------------------------------------------------------------------------
    def state_schema(self) -> Schema:
        """What `load()` accepts (checked before it runs; pyvirt/state.py)."""
        return record({"status": U8, "driver_features": U64, "config_generation": U32,
                       "needs_reset_reason": text(),
                       "queues": items([q.state_schema() for q in self.queues]),
                       "device": self.device_state_schema()})

    def save(self) -> dict[str, Any]:
        return {"status": self.status, "driver_features": self.driver_features,
                "config_generation": self.config_generation,
                "needs_reset_reason": self.needs_reset_reason,
                "queues": [q.save() for q in self.queues], "device": self.save_device()}

    def load(self, state: dict[str, Any]) -> None:
        if len(state["queues"]) != len(self.queues):
            raise ValueError(f"virtio {self.device_id}: snapshot has {len(state['queues'])} queues, "
                             f"the device {len(self.queues)}")
        self.status = state["status"]
        self.driver_features = state["driver_features"]
        self.config_generation = state["config_generation"]
        self.needs_reset_reason = state["needs_reset_reason"]
        for q, s in zip_strict(self.queues, state["queues"]):
            q.load(s)
        self.load_device(state["device"])
        self.restored()

    def restored(self) -> None:
        """Called at the end of `load()`, the device's state in place: a device whose host
        side must take over the restored rings (virtio-fs's back end) does it here.  It adds
        no state, so the state schema stays beside save()/load()."""
