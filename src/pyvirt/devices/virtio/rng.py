"""virtio-rng, the entropy device (virtio 1.2, section 5.4): host randomness into guest buffers."""

from __future__ import annotations

import os

from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.queue import SplitQueue

VIRTIO_ID_RNG = 4
MAX_PER_REQUEST = 64 * 1024     # a guest cannot make the host produce unbounded data


class VirtioRng(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    num_queues = 1

    def process(self, index: int, queue: SplitQueue) -> bool:
        notify = False
        while True:
            chain = queue.pop()
            if chain is None:
                return notify
            want = min(chain.writable_len, MAX_PER_REQUEST)
            written = queue.scatter(chain.writable, os.urandom(want)) if want else 0
            notify |= queue.push(chain, written)
