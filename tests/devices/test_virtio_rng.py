"""virtio-rng through the mock driver."""

from __future__ import annotations

from pyvirt.devices.virtio.rng import MAX_PER_REQUEST, VirtioRng
from pyvirt.testing.virtio_rig import make_rig
from pyvirt.testing.virtq import Buffer


def test_fills_buffers_from_the_host() -> None:
    rig = make_rig(VirtioRng())
    (q,) = rig.drv.init()
    a, b = rig.drv.buffer(64, writable=True), rig.drv.buffer(300, writable=True)
    head = q.add([a, b])
    rig.drv.kick()
    assert q.used_entries() == [(head, 364)]
    assert rig.drv.read(a) != bytes(64) and rig.drv.read(b) != bytes(300)
    assert rig.irq.level


def test_per_request_cap() -> None:
    calls: list[int] = []

    def source(n: int) -> bytes:
        calls.append(n)
        return b"\x5a" * n

    rig = make_rig(VirtioRng(source=source), ram_size=8 << 20)
    (q,) = rig.drv.init()
    big = rig.drv.buffer(1 << 20, writable=True)
    head = q.add([big])
    rig.drv.kick()
    assert q.used_entries() == [(head, MAX_PER_REQUEST)]
    assert calls == [MAX_PER_REQUEST]
    got = rig.drv.read(big)
    assert got[:MAX_PER_REQUEST] == b"\x5a" * MAX_PER_REQUEST and got[MAX_PER_REQUEST:] == bytes(len(got) - MAX_PER_REQUEST)


def test_readable_buffers_get_nothing() -> None:
    rig = make_rig(VirtioRng(source=lambda n: b"\x01" * n))
    (q,) = rig.drv.init()
    out = rig.drv.buffer(16, writable=True)
    head = q.add([rig.drv.buffer(b"driver data"), out])
    rig.drv.kick()
    assert q.used_entries() == [(head, 0)] and rig.drv.read(out) == bytes(16)
    head = q.add([Buffer(out.addr, 0, True)])     # an empty buffer: nothing to give
    rig.drv.kick()
    assert q.used_entries() == [(head, 0)]
    assert rig.device.bytes_served == 0 and rig.bus.stray == []
