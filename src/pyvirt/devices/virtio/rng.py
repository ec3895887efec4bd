"""virtio-rng, the entropy device (virtio 1.2, 5.4 "Entropy Device").

One queue, "requestq".  The driver posts device-writable buffers; the device
fills them with random bytes from the host (os.urandom) and returns them.  It
"MAY use less than the entire buffer length" (5.4.6.1), so each request is
capped at `MAX_PER_REQUEST` bytes: a guest cannot make the host produce
unbounded data for one descriptor.  A chain with device-readable buffers
breaks 5.4.6.2 ("driver MUST NOT place driver-readable buffers into the
queue") and completes with 0 bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pyvirt.devices.virtio.device import VirtioDevice
from pyvirt.devices.virtio.queue import SplitQueue

VIRTIO_ID_RNG = 4
MAX_PER_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    num_queues = 1

    def __init__(self, source: Callable[[int], bytes] = os.urandom) -> None:
        super().__init__()
        self.source = source
        self.bytes_served = 0

    def process(self, index: int, queue: SplitQueue) -> None:
        while (chain := queue.pop()) is not None:
            written = 0
            if not chain.readable:
                want = min(chain.writable_len, MAX_PER_REQUEST)
                if want:
                    written = queue.scatter(chain.writable, self.source(want)[:want])
            self.bytes_served += written
            queue.push(chain.head, written)
