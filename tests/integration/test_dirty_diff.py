"""The dirty-page log against the kernel: a booted default guest does CPU stores, disk
reads (virtio-blk DMA, page cache dropped each round) and network receives (frames from a
stream peer, virtio-net DMA) while the bus's log and userfaultfd write-protection
(pyvirt.testing.uffd) both watch guest RAM; at every check, between two slices, no page the
kernel saw written may be missing from the log.  With virtio's DMA report muted (the test
switch: SplitQueue.dma_written does nothing) the same run must find pages missing."""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.devices.virtio.queue import SplitQueue
from pyvirt.request import VmRequest, resolve
from pyvirt.testing import uffd
from pyvirt.vmm.vm import Vm, Watch

pytestmark = pytest.mark.slow

WORKLOAD = ("ip link set eth0 up; i=0; while [ $i -lt 12 ]; do "
            "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda of=/dev/null bs=64k 2>/dev/null; "
            "dd if=/dev/zero of=/tmp/f bs=64k count=32 2>/dev/null; i=$((i+1)); done; "
            "echo rx=$(cat /sys/class/net/eth0/statistics/rx_packets)")


def frame_sender(listener: socket.socket, stop: threading.Event) -> None:
    """Accept the VM's stream NIC and send it broadcast frames until stopped."""
    listener.settimeout(60)
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    frame = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x99" + b"\x88\xb5" + os.urandom(1400)
    with conn:
        while not stop.wait(0.005):
            try:
                conn.sendall(struct.pack(">I", len(frame)) + frame)
            except OSError:
                return


def run_compared(tmp_path: Path, default_image: object) -> tuple[list[set[int]], str, int]:
    """Boot the workload; the pages the kernel saw written but the log missed at each
    check, the console, and the disk's read count."""
    why = uffd.unavailable()
    if why:
        pytest.skip(why)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(4 << 20))
    sock = tmp_path / "net.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)
    stop = threading.Event()
    sender = threading.Thread(target=frame_sender, args=(listener, stop), daemon=True)
    sender.start()
    resolved = resolve(VmRequest(command=WORKLOAD, disks=[str(disk)], nets=[f"stream={sock}"], memory="128M"))
    console = BufferBackend(limit=1 << 16)
    vm = Vm(resolved.spec, console)
    bus = vm.board.bus
    tracker = uffd.WriteTracker(bus.ram)
    assert tracker.offset == 0
    bus.start_dirty_log()
    tracker.harvest()
    missed: list[set[int]] = []
    ticks = [0]

    def check() -> None:
        ticks[0] += 1
        if ticks[0] % 10 == 0:
            written = tracker.harvest()
            missed.append(written - vm.board.bus.harvest_dirty())

    vm.watches.append(Watch(lambda: [], lambda ready: None, check))
    try:
        code = vm.run(timeout=240)
        check()
        reads = vm.board.virtio[0][2].device.stats["reads"]
    finally:
        stop.set()
        tracker.close()
        vm.close()
        listener.close()
        resolved.cleanup()
    assert code == 0, console.output.decode(errors="replace")[-2000:]
    return missed, console.output.decode(errors="replace"), reads


def test_no_page_written_but_unlogged(tmp_path: Path, default_image: object) -> None:
    missed, out, reads = run_compared(tmp_path, default_image)
    assert len(missed) > 20
    rx = int(out.rsplit("rx=", 1)[1].split()[0])
    assert rx > 50, "the guest received no frames"
    assert reads > 12
    bad = [sorted(m)[:8] for m in missed if m]
    assert not bad, f"pages written but not logged: {bad[:5]}"


def test_a_muted_dma_path_is_found(tmp_path: Path, default_image: object,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SplitQueue, "dma_written", lambda self, spans, count=None: None)
    missed, _, _ = run_compared(tmp_path, default_image)
    assert any(missed), "virtio-blk's reads went unreported, yet the comparison found nothing"
