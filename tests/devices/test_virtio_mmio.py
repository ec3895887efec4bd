"""The virtio-mmio transport and the device status machine, through the registers."""

from __future__ import annotations

import pytest

from pyvirt.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from pyvirt.devices.virtio.mmio import (
    CONFIG_GENERATION,
    DEVICE_ID,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    INTERRUPT_STATUS,
    MAGIC_VALUE,
    QUEUE_DESC_LOW,
    QUEUE_NUM,
    QUEUE_NUM_MAX,
    QUEUE_READY,
    QUEUE_SEL,
    SHM_BASE_HIGH,
    SHM_LEN_LOW,
    STATUS,
    VENDOR,
    VERSION_REG,
)
from pyvirt.devices.virtio.rng import VirtioRng
from pyvirt.testing.virtio_rig import MMIO, RAM, make_rig
from pyvirt.testing.virtq import Buffer, DriverError

ACK_DRV = STATUS_ACKNOWLEDGE | STATUS_DRIVER


@pytest.fixture
def rig():
    return make_rig(VirtioRng(source=lambda n: b"\x42" * n))


def test_identification(rig) -> None:
    d = rig.drv
    assert d.reg(MAGIC_VALUE) == 0x74726976 and d.reg(VERSION_REG) == 2
    assert d.reg(DEVICE_ID) == 4 and d.reg(VENDOR) != 0
    feats = d.device_features()
    assert feats & VIRTIO_F_VERSION_1 and feats & VIRTIO_F_EVENT_IDX and feats & VIRTIO_F_INDIRECT_DESC
    assert d.reg(SHM_LEN_LOW) == 0xFFFF_FFFF and d.reg(SHM_BASE_HIGH) == 0xFFFF_FFFF


def test_linux_style_init_and_request(rig) -> None:
    (q,) = rig.drv.init()
    assert rig.drv.status == ACK_DRV | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    buf = rig.drv.buffer(32, writable=True)
    q.add([buf])
    rig.drv.kick()
    assert q.used_entries() == [(0, 32)]
    assert rig.drv.read(buf) == b"\x42" * 32
    assert rig.irq.level and rig.drv.ack_interrupt() == 1 and not rig.irq.level


def test_features_never_offered_are_refused(rig) -> None:
    d = rig.drv
    assert not d.negotiate(accept=VIRTIO_F_VERSION_1 | (1 << 40))
    assert d.status == ACK_DRV                    # FEATURES_OK did not stick
    d.driver_ok()
    assert not d.status & STATUS_DRIVER_OK        # and the device does not go live
    assert d.negotiate(accept=VIRTIO_F_VERSION_1)  # a reset and a fair offer work


def test_version_1_is_required(rig) -> None:
    assert not rig.drv.negotiate(accept=VIRTIO_F_EVENT_IDX)
    with pytest.raises(DriverError):
        rig.drv.init(accept=0)


def test_features_frozen_after_features_ok(rig) -> None:
    d = rig.drv
    assert d.negotiate(accept=VIRTIO_F_VERSION_1)
    d.set(DRIVER_FEATURES_SEL, 0)
    d.set(DRIVER_FEATURES, VIRTIO_F_EVENT_IDX)
    assert rig.device.driver_features == VIRTIO_F_VERSION_1


def test_status_bits_cannot_be_cleared(rig) -> None:
    d = rig.drv
    assert d.negotiate()
    d.set(STATUS, STATUS_ACKNOWLEDGE)             # drops DRIVER and FEATURES_OK: ignored
    assert d.status == ACK_DRV | STATUS_FEATURES_OK
    d.set(STATUS, d.status | STATUS_DEVICE_NEEDS_RESET)   # the device's bit, not the driver's
    assert not d.status & STATUS_DEVICE_NEEDS_RESET
    d.set(STATUS, d.status | STATUS_FAILED)
    assert d.status & STATUS_FAILED


def test_driver_ok_without_features_ok_refused(rig) -> None:
    d = rig.drv
    d.set(STATUS, STATUS_ACKNOWLEDGE)
    d.set(STATUS, ACK_DRV | STATUS_DRIVER_OK)
    assert d.status == ACK_DRV


def test_no_processing_before_driver_ok_or_after_failed(rig) -> None:
    d = rig.drv
    assert d.negotiate()
    q = d.setup_queue(0)
    q.add([d.buffer(8, writable=True)])
    d.kick()
    assert q.used_entries() == []                 # not live yet
    d.driver_ok()
    d.set(STATUS, d.status | STATUS_FAILED)
    d.kick()
    assert q.used_entries() == []


def test_queue_registers(rig) -> None:
    d = rig.drv
    assert d.negotiate()
    d.set(QUEUE_SEL, 5)
    assert d.reg(QUEUE_NUM_MAX) == 0 and d.reg(QUEUE_READY) == 0   # no such queue
    d.set(QUEUE_READY, 1)                         # ignored
    q = d.setup_queue(0, size=16)
    dq = rig.device.queues[0]
    assert (dq.size, dq.desc, dq.avail, dq.used, dq.ready) == (16, q.desc, q.avail, q.used, True)
    d.set(QUEUE_NUM, 4)                           # ready: address and size writes are ignored
    d.set(QUEUE_DESC_LOW, 0x1234)
    assert (dq.size, dq.desc) == (16, q.desc)
    d.set(QUEUE_READY, 0)
    assert d.reg(QUEUE_READY) == 0


def test_bad_queue_layout_needs_reset_at_driver_ok(rig) -> None:
    d = rig.drv
    assert d.negotiate()
    d.setup_queue(0, size=12)                     # not a power of two
    d.driver_ok()
    assert d.status & STATUS_DEVICE_NEEDS_RESET
    assert rig.irq.level and d.ack_interrupt() == 2       # configuration-change notification
    d.init()                                      # a reset recovers the device
    assert not d.status & STATUS_DEVICE_NEEDS_RESET


@pytest.mark.parametrize("size", [0, 512, 3])
def test_queue_size_checked(rig, size: int) -> None:
    d = rig.drv
    assert d.negotiate()
    d.set(QUEUE_SEL, 0)
    d.set(QUEUE_NUM, size)
    d.set(QUEUE_READY, 1)
    d.driver_ok()
    assert d.status & STATUS_DEVICE_NEEDS_RESET


def test_reset_clears_everything(rig) -> None:
    d = rig.drv
    (q,) = d.init()
    q.add([d.buffer(4, writable=True)])
    d.kick()
    assert rig.irq.level
    d.set(STATUS, 0)
    assert d.status == 0 and not rig.irq.level and d.reg(INTERRUPT_STATUS) == 0
    assert rig.device.driver_features == 0 and not rig.device.queues[0].ready


def test_odd_access_widths_ignored(rig) -> None:
    bus = rig.bus
    assert bus.read(MMIO + MAGIC_VALUE, 2) == 0 and bus.read(MMIO + MAGIC_VALUE + 1, 4) == 0
    bus.write(MMIO + STATUS, 1, STATUS_ACKNOWLEDGE)
    assert rig.drv.status == 0
    assert rig.drv.config_read(0, 4) == 0         # rng has no configuration space
    assert rig.drv.reg(CONFIG_GENERATION) == 0
    assert rig.bus.stray == []


def test_config_change_bumps_generation(rig) -> None:
    rig.drv.init()
    rig.device.config_changed()
    assert rig.drv.config_generation() == 1 and rig.drv.ack_interrupt() == 2


def test_save_load_mid_run(rig) -> None:
    d = rig.drv
    (q,) = d.init()
    q.add([d.buffer(8, writable=True)])
    d.kick()
    assert q.used_entries() == [(0, 8)]
    state = rig.mmio.save()
    ram = rig.bus.read_bytes(RAM, rig.bus.ram_size)
    other = make_rig(VirtioRng(source=lambda n: b"\x17" * n))
    other.bus.write_bytes(RAM, ram)
    other.mmio.load(state)
    assert other.irq.level and other.drv.status == d.status
    q.bus = other.bus                             # the same guest, now on the restored machine
    buf = Buffer(d.alloc(8), 8, True)
    head = q.add([buf])
    other.drv.kick()
    assert q.used_entries() == [(head, 8)]
    assert other.bus.read_bytes(buf.addr, 8) == b"\x17" * 8
