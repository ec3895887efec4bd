"""virtio-fs, a shared host folder (virtio 1.2, 5.11 "File System Device"), served by a
vhost-user back end (virtiofsd) in another process.

Configuration space (5.11.4)::

    u8   tag[36]                 the name the guest mounts (`mount -t virtiofs TAG DIR`),
                                 UTF-8, NUL-padded
    le32 num_request_queues      request queues after the high-priority queue

Queues: 0 is "hiprio" (FUSE_FORGET, FUSE_INTERRUPT), 1 the one request queue.  pyvirt
serves no request itself: when the driver goes live (DRIVER_OK) the device hands the back
end the negotiated features, guest RAM (the board's memfd) and each ready queue with three
eventfds (`backends/vhost_user.py`).  The driver's QueueNotify writes the queue's *kick*
eventfd; the board's I/O loop polls each *call* eventfd (they are in `wait_fds`, so an
idle VM wakes) and raises the used-buffer interrupt.  virtiofsd (libvhost-user) also
signals each call eventfd once when it is handed over, so DRIVER_OK brings one interrupt
with nothing used -- legal (virtio lets a device interrupt spuriously): a driver checks
the used ring on an interrupt and takes only what it finds there.

Coherence.  virtiofsd writes guest pages behind the CPU's back (a file read lands in the
page cache the guest later executes from).  Before the interrupt is raised -- and at every
poll, since the driver may take used entries without one -- each new used-ring entry's
device-writable buffers are walked and reported to the bus (`Bus.dma_written`): translated
code from those pages is dropped and the dirty-page log marks them.  The used ring and the
descriptors are in guest memory, so the walk is bounded by the queue size and a chain the
guest has scribbled over is skipped (it only hurts the guest).  VIRTIO_F_EVENT_IDX is not
offered: with it the back end may write used entries that neither an interrupt nor the
driver's kick bring to our attention for longer.

A driver reset (or the machine's) stops the rings (GET_VRING_BASE); the next DRIVER_OK
starts them afresh.  Snapshots: virtiofsd's FUSE state (node IDs, open handles) cannot be
saved, so a VM is snapshotted only with its shares unmounted in the guest and no request in
flight (`in_flight`); a restored device hands its rings, where they stand, to the fresh
virtiofsd its VM started (docs/shares.md, "Snapshots").  A back end that breaks the protocol, goes away or reports a ring error
puts the device in DEVICE_NEEDS_RESET; the VM goes on (the share's files fail with EIO).
"""

from __future__ import annotations

import logging
import os
import select

from pyvirt.backends.vhost_user import Region, VhostUserError, VhostUserFrontEnd
from pyvirt.devices.virtio.device import (
    INT_USED,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from pyvirt.devices.virtio.queue import QueueError, SplitQueue
from pyvirt.errors import ConfigError

log = logging.getLogger(__name__)

VIRTIO_ID_FS = 26
TAG_SIZE = 36
QUEUE_SIZE = 128
OFFERED = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC


def check_tag(tag: str) -> bytes:
    """The tag as the configuration space holds it (ConfigError if it cannot)."""
    raw = tag.encode()
    if not raw or len(raw) > TAG_SIZE or b"\0" in raw:
        raise ConfigError(f"a share's tag is 1..{TAG_SIZE} bytes, not {tag!r}")
    return raw


class VirtioFs(VirtioDevice):
    device_id = VIRTIO_ID_FS
    num_queues = 2                       # hiprio + one request queue
    queue_max_size = QUEUE_SIZE

    serves_host = True

    def __init__(self, front: VhostUserFrontEnd, tag: str, ram_fd: int | None = None) -> None:
        super().__init__()
        self.front = front
        self.tag = tag
        self._tag = check_tag(tag)
        self.ram_fd = ram_fd             # (None: the bus's, a memfd: memory.shared_ram)
        if not front.features & VIRTIO_F_VERSION_1:
            raise ConfigError(f"share {tag}: the back end does not offer VIRTIO_F_VERSION_1")
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.num_queues)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.num_queues)]
        self.errs = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.num_queues)]
        self.started: list[int] = []     # rings the back end runs
        self.seen_used = [0] * self.num_queues
        self.pages_marked = 0            # device-writable bytes reported to the bus

    # -- virtio -------------------------------------------------------------------------
    def features(self) -> int:
        return self.front.features & OFFERED

    def config(self) -> bytes:
        return self._tag.ljust(TAG_SIZE, b"\0") + (self.num_queues - 1).to_bytes(4, "little")

    def activate(self) -> None:
        """DRIVER_OK: hand the back end guest RAM and every ready queue."""
        self._start_backend(restored=False)

    def _start_backend(self, restored: bool) -> None:
        """Features, RAM and the ready rings to the back end.  A ring the driver just set up
        starts at index 0; a restored one (`restored`: a snapshot taken with the share
        unmounted, every request answered) where its used index stands."""
        assert self.bus is not None
        bus = self.bus
        ram_fd = self.ram_fd if self.ram_fd is not None else bus.ram_fd
        if ram_fd is None:
            self.needs_reset("guest RAM is not shareable (no memfd)")
            return
        try:
            self.front.set_features(self.driver_features)
            self.front.set_mem_table([Region(bus.ram_base, bus.ram_size, ram_fd)])
            for i, q in enumerate(self.queues):
                if not q.ready:
                    continue
                base = bus.read(q.used + 2, 2) if restored else 0
                self.seen_used[i] = base
                self.front.start_ring(i, q.size, q.desc, q.avail, q.used,
                                      self.kicks[i], self.calls[i], self.errs[i], base=base)
                self.started.append(i)
        except VhostUserError as e:
            self.needs_reset(str(e))

    def in_flight(self) -> int:
        """Requests the driver made available that the back end has not answered yet, over
        the running rings (a snapshot needs none: virtiofsd's work is not saved)."""
        n = 0
        for i in self.started:
            q = self.queues[i]
            if q.ready and not q.broken:
                n += (q.bus.read(q.avail + 2, 2) - q.bus.read(q.used + 2, 2)) & 0xFFFF
        return n

    def restored(self) -> None:
        """A restored device: a fresh back end takes over the rings where they stand.  The
        snapshot was taken with the share unmounted in the guest (host/snapshots.py), so
        the guest holds no FUSE node of the old virtiofsd and has nothing in flight; its
        next mount starts a new FUSE session on this back end."""
        if self.live:
            self._start_backend(restored=True)

    def notify(self, index: int) -> None:
        """QueueNotify: the back end's kick (it serves the queue)."""
        if self.live and index in self.started:
            os.eventfd_write(self.kicks[index], 1)

    def process(self, index: int, queue: SplitQueue) -> None:     # (never called: notify kicks)
        raise AssertionError("virtio-fs queues are served by the back end")

    def device_reset(self) -> None:
        self._stop_rings()

    def _stop_rings(self) -> None:
        started, self.started = self.started, []
        for i in started:
            try:
                self.front.stop_ring(i)
            except VhostUserError as e:
                log.warning("share %s: %s", self.tag, e)
                return
        for fd in self.calls + self.errs:
            self._drain(fd)

    # -- the board's I/O loop ------------------------------------------------------------
    def wait_fds(self) -> list[int]:
        return [*self.calls, *self.errs, self.front.fileno()] if self.started else []

    def poll(self) -> None:
        """Report what the back end wrote, then raise the interrupt it asked for (one
        select() over the eventfds and the socket: this runs between every CPU slice)."""
        if not self.started:
            return
        try:
            ready = set(select.select(self.wait_fds(), [], [], 0)[0])
        except (OSError, ValueError):
            ready = {self.front.fileno()}
        if self.front.fileno() in ready and self.front.peer_gone():
            self.needs_reset("the back end (virtiofsd) went away")
            self.started = []
            return
        for i in self.started:
            if self.errs[i] in ready and self._drain(self.errs[i]):
                self.needs_reset(f"the back end reported an error on queue {i}")
                return
            signalled = self.calls[i] in ready and self._drain(self.calls[i])
            self.mark_used(i)
            if signalled and self.live:
                self._interrupt(INT_USED)

    @staticmethod
    def _drain(fd: int) -> bool:
        try:
            return os.eventfd_read(fd) > 0
        except BlockingIOError:
            return False

    def mark_used(self, index: int) -> int:
        """Walk queue `index`'s used entries since the last walk and report each one's
        device-writable buffers to the bus; returns how many entries were walked."""
        q = self.queues[index]
        if not q.ready or q.broken:
            return 0
        bus = q.bus
        idx = bus.read(q.used + 2, 2)
        new = (idx - self.seen_used[index]) & 0xFFFF
        if new > q.size:                 # the guest wrote the used index: walk the whole ring
            new = q.size
        start = (idx - new) & 0xFFFF
        for k in range(new):
            slot = q.used + 4 + 8 * ((start + k) & (q.size - 1))
            head = bus.read(slot, 4)
            try:
                chain = q.chain_at(head)
            except QueueError:
                continue                 # overwritten by the guest since: its own loss
            for addr, length in chain.writable:
                bus.dma_written(addr, length)
                self.pages_marked += length
        self.seen_used[index] = idx
        return new

    def close(self) -> None:
        for fd in self.kicks + self.calls + self.errs:
            os.close(fd)
        self.kicks = self.calls = self.errs = []
