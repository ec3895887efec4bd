"""The source's side of a migration: a destination that goes away at any phase (closed
connection, killed process), refuses, or answers nonsense leaves the source VM running and
unchanged (no dirty log left on, the clock running, the run loop going on); a destination
that plays along to the end makes the source stop with the VM marked migrated."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.backends.dirty import BLOCK
from pyvirt.machine.boot import IMAGE_MAGIC2
from pyvirt.spec import DiskSpec, make_spec
from pyvirt.testing.migrate import connect, start_destination
from pyvirt.vmm import migration as mig
from pyvirt.vmm.vm import Vm, Watch

PHASES = ["hello", "spec", "pages", "complete", "ready"]


def source_vm(tmp_path: Path, disk: bool = False) -> Vm:
    kernel = tmp_path / "k"
    # An Image whose first instruction jumps to itself: a guest that runs for ever.
    kernel.write_bytes(b"\x6f\x00\x00\x00" + bytes(52) + IMAGE_MAGIC2 + bytes(4))
    disks = []
    if disk:                                          # (2 MiB of data to copy)
        (tmp_path / "d.raw").write_bytes(os.urandom(2 << 20))
        disks = [DiskSpec(path=tmp_path / "d.raw")]
    vm = Vm(make_spec(kernel=kernel, memory=32 << 20, disks=disks), BufferBackend())
    bus = vm.board.bus
    for i in range(0, 2000, 7):                       # some non-zero pages to send
        bus.write_bytes(bus.ram_base + (1 << 20) + i * 4096, os.urandom(64))
    return vm


def fake_destination(sock: socket.socket, stop_at: str) -> None:
    """Play the destination until `stop_at`, then close the connection."""
    try:
        for phase in PHASES:
            if phase == stop_at:
                return
            if phase in ("hello", "spec"):
                mig.recv_frame(sock, (mig.HELLO, mig.SPEC), 1 << 20)
                sock.sendall(mig.HEADER.pack(mig.OK, 0))
            elif phase == "pages":
                for _ in range(5):
                    if mig.recv_frame(sock, (mig.CODE, mig.PAGES, mig.BLOCKS, mig.SYNC))[0] == mig.SYNC:
                        sock.sendall(mig.HEADER.pack(mig.OK, 0))
            elif phase == "complete":
                while (kind := mig.recv_frame(sock, (mig.CODE, mig.PAGES, mig.BLOCKS, mig.SYNC, mig.STATE,
                                                     mig.COMPLETE))[0]) != mig.COMPLETE:
                    if kind == mig.SYNC:
                        sock.sendall(mig.HEADER.pack(mig.OK, 0))
            elif phase == "ready":
                sock.sendall(mig.HEADER.pack(mig.READY, 0))
                mig.recv_frame(sock, (mig.GO,))
    except mig.MigrationError:
        pass
    finally:
        sock.close()


def run_source(vm: Vm, sock: socket.socket, dirty: bool = False, **kw: object) -> mig.Migration:
    """Migrate `vm` over `sock` while it runs (`dirty`: the host scribbles over 4 MiB of its
    RAM between slices, a guest that never converges); until the migration ended."""
    m = mig.Migration(vm, sock, "t", **kw)  # type: ignore[arg-type]
    ticks = [0]
    bus = vm.board.bus

    def stop_later() -> None:
        ticks[0] += 1
        if dirty:
            bus.write_bytes(bus.ram_base + (4 << 20), os.urandom(4 << 20))
        if m.done and ticks[0] > 5:
            vm.request_quit()
    vm.watches.append(Watch(lambda: [], lambda ready: None, stop_later))    # before the migration's
    m.attach()
    vm.run(timeout=30)
    return m


@pytest.mark.parametrize("copy", [False, True], ids=["shared", "disk-copy"])
@pytest.mark.parametrize("stop_at", PHASES[:-1])
def test_a_destination_gone_at_any_phase_leaves_the_source_running(tmp_path: Path, stop_at: str,
                                                                   copy: bool) -> None:
    """(with a disk copied, its blocks are the first frames after the spec)"""
    vm = source_vm(tmp_path, disk=copy)
    disks = list(vm.board.backends)
    a, b = socket.socketpair()
    t = threading.Thread(target=fake_destination, args=(b, stop_at))
    t.start()
    try:
        before = vm.stats.instructions
        m = run_source(vm, a, downtime=0.3, copy_storage=copy)
        t.join(10)
        assert m.done and m.stats.outcome == "failed", m.stats
        assert m.stats.error and "\n" not in m.stats.error
        if copy and stop_at == "complete":            # (the disk's blocks go first: all 32 of them)
            assert m.stats.blocks_sent == (2 << 20) // BLOCK, m.stats
        elif not copy:
            assert m.stats.blocks_sent == 0
        assert vm.board.backends == disks and all(                   # the disks untracked again
            t.device.backend in disks for _, _, t in vm.board.virtio if hasattr(t.device, "backend"))
        assert not getattr(vm, "migrated", False) and not vm.board.bus.dirty_log
        assert vm.board.clock._paused_at is None            # the guest's time runs on
        assert vm.stats.instructions > before
        vm.quit_requested = False                           # and the VM runs on
        ran = vm.stats.instructions
        vm.run(max_instructions=ran + 100_000)
        assert vm.stats.instructions > ran
    finally:
        vm.close()


def test_the_whole_way_the_source_ends_migrated(tmp_path: Path) -> None:
    vm = source_vm(tmp_path)
    a, b = socket.socketpair()
    t = threading.Thread(target=fake_destination, args=(b, "never"))
    t.start()
    try:
        m = run_source(vm, a)
        t.join(10)
        assert m.stats.outcome == "completed" and getattr(vm, "migrated", False)
        assert m.stats.pages_sent >= 2000 // 7
    finally:
        vm.close()


def test_timeout_cancel_keeps_the_source(tmp_path: Path) -> None:
    """A destination that takes pages but never gets to the end: cancel at the timeout."""
    vm = source_vm(tmp_path)
    a, b = socket.socketpair()

    def slow(sock: socket.socket) -> None:
        mig.recv_frame(sock, (mig.HELLO,), 1 << 20)
        sock.sendall(mig.HEADER.pack(mig.OK, 0))
        mig.recv_frame(sock, (mig.SPEC,), 1 << 20)
        sock.sendall(mig.HEADER.pack(mig.OK, 0))
        try:
            while True:
                if mig.recv_frame(sock, (mig.CODE, mig.PAGES, mig.SYNC))[0] == mig.SYNC:
                    sock.sendall(mig.HEADER.pack(mig.OK, 0))
                time.sleep(0.05)
        except (mig.MigrationError, OSError):             # the source hung up at the cancel
            pass
        sock.close()
    t = threading.Thread(target=slow, args=(b,))
    t.start()
    try:
        m = run_source(vm, a, dirty=True, timeout=1.0, on_timeout="cancel", downtime=0.001)
        t.join(10)
        assert m.stats.outcome == "cancelled", m.stats
        assert not getattr(vm, "migrated", False)
        assert m.stats.total_seconds >= 1.0
    finally:
        vm.close()


def test_kill_9_of_the_destination_process(tmp_path: Path) -> None:
    """The real destination (pyvirt.testing.migrate), killed while pages flow."""
    vm = source_vm(tmp_path)
    dest = start_destination(tmp_path / "d.sock", "t", 1.0)
    sock = connect(tmp_path / "d.sock")
    ticks = [0]

    def kill() -> None:                       # at the source's third tick: pages are flowing
        ticks[0] += 1
        if ticks[0] == 3:
            os.kill(dest.pid, signal.SIGKILL)
            dest.wait(10)
    vm.watches.append(Watch(lambda: [], lambda ready: None, kill))
    try:
        m = run_source(vm, sock, dirty=True, downtime=0.0001)
        dest.wait(10)
        assert m.stats.outcome == "failed", m.stats
        assert not getattr(vm, "migrated", False)
        assert m.stats.pages_sent > 0                      # it died while pages flowed
    finally:
        vm.close()
    assert json.loads(json.dumps(m.stats.as_dict()))["outcome"] == "failed"


def test_a_destination_that_does_not_read_does_not_stall_the_guest(tmp_path: Path) -> None:
    """8 MiB of pages that do not compress, to a destination that takes the handshake and then
    reads nothing for 3 s (as one building its board or translating would): the source's
    run loop goes on between slices all the while -- its frames wait in a queue, not in a
    blocking send."""
    vm = source_vm(tmp_path)
    bus = vm.board.bus
    bus.write_bytes(bus.ram_base + (8 << 20), os.urandom(8 << 20))
    a, b = socket.socketpair()

    def deaf(sock: socket.socket) -> None:
        for kind in (mig.HELLO, mig.SPEC):
            mig.recv_frame(sock, (kind,), 1 << 20)
            sock.sendall(mig.HEADER.pack(mig.OK, 0))
        time.sleep(3)
        sock.close()
    t = threading.Thread(target=deaf, args=(b,))
    t.start()
    beats: list[float] = []
    vm.watches.append(Watch(lambda: [], lambda ready: None, lambda: beats.append(time.monotonic())))
    try:
        m = run_source(vm, a)
        t.join(10)
        assert m.stats.outcome == "failed", m.stats                  # (it closed without reading)
        assert beats[-1] - beats[0] >= 2.5                          # (it ran through the 3 s)
        longest = max(y - x for x, y in zip(beats, beats[1:]))
        assert longest < 1.0, f"the guest stalled {longest:.2f} s"
    finally:
        vm.close()


def test_the_stop_and_copy_waits_until_the_destination_has_taken_in_the_round(tmp_path: Path) -> None:
    """A destination slow to take in what it was sent (on a link whose buffers hold it all,
    as TCP's do) answers the end of round 1 (SYNC) a second late: the source pauses the
    guest only after that answer, so the pause does not hold the destination's backlog."""
    vm = source_vm(tmp_path)
    a, b = socket.socketpair()
    seen: dict[str, float] = {}

    def behind(sock: socket.socket) -> None:
        try:
            for kind in (mig.HELLO, mig.SPEC):
                mig.recv_frame(sock, (kind,), 1 << 20)
                sock.sendall(mig.HEADER.pack(mig.OK, 0))
            while True:
                kind, _ = mig.recv_frame(sock, (mig.CODE, mig.PAGES, mig.SYNC, mig.STATE, mig.COMPLETE))
                if kind == mig.SYNC and "ok" not in seen:
                    time.sleep(1.0)
                    seen["ok"] = time.monotonic()
                    sock.sendall(mig.HEADER.pack(mig.OK, 0))
                elif kind == mig.SYNC:
                    sock.sendall(mig.HEADER.pack(mig.OK, 0))
                elif kind == mig.STATE:
                    seen["state"] = time.monotonic()
                elif kind == mig.COMPLETE:
                    break
            sock.sendall(mig.HEADER.pack(mig.READY, 0))
            mig.recv_frame(sock, (mig.GO,))
        except mig.MigrationError:
            pass
        finally:
            sock.close()
    t = threading.Thread(target=behind, args=(b,))
    t.start()
    try:
        m = run_source(vm, a, downtime=0.3)
        t.join(10)
        assert m.stats.outcome == "completed", m.stats
        assert "ok" in seen and seen["state"] > seen["ok"]
        assert m.stats.downtime_seconds < 0.5, m.stats
    finally:
        vm.close()


def test_round_one_sends_every_non_zero_page_and_reads_only_those_touched(tmp_path: Path) -> None:
    """Pages written through the bus, straight into RAM (as native code stores), written and
    zeroed again, or only read: the destination's copy of RAM equals the source's; and
    round 1 found them through the page table, without reading (so mapping) the rest."""
    import mmap
    vm = source_vm(tmp_path)
    bus = vm.board.bus
    npages = bus.ram_size >> 12
    bus.write_bytes(bus.ram_base + (5000 << 12) + 4095, b"\x01")
    bus.ram[(6000 << 12) + 17] = 0x5A
    bus.ram[7000 << 12:(7000 << 12) + 4096] = os.urandom(4096)
    bus.ram[7000 << 12:(7000 << 12) + 4096] = bytes(4096)
    assert bus.ram[8000 << 12] == 0
    copy = mmap.mmap(-1, bus.ram_size)
    a, b = socket.socketpair()

    def destination(sock: socket.socket) -> None:
        try:
            for kind in (mig.HELLO, mig.SPEC):
                mig.recv_frame(sock, (kind,), 1 << 20)
                sock.sendall(mig.HEADER.pack(mig.OK, 0))
            while (got := mig.recv_frame(sock, (mig.CODE, mig.PAGES, mig.SYNC, mig.STATE, mig.COMPLETE)))[0] \
                    != mig.COMPLETE:
                if got[0] == mig.PAGES:
                    mig.apply_pages(copy, npages, got[1])
                elif got[0] == mig.SYNC:
                    sock.sendall(mig.HEADER.pack(mig.OK, 0))
            sock.sendall(mig.HEADER.pack(mig.READY, 0))
            mig.recv_frame(sock, (mig.GO,))
        finally:
            sock.close()
    t = threading.Thread(target=destination, args=(b,))
    t.start()
    try:
        m = run_source(vm, a)
        t.join(10)
        assert m.stats.outcome == "completed", m.stats
        touched = bus.touched_pages(0, npages)                      # (before the comparison reads all)
        assert touched is not None and {5000, 6000, 7000, 8000} <= set(touched)
        # The rest never mapped: nothing was written at 10-18 MiB (pages 2560-4607; RAM may be in
        # 2 MiB huge pages, so a neighbour of a written page may count as touched).
        assert not [p for p in touched if 2560 <= p < 4608], len(touched)
        assert copy[:] == bus.ram[:bus.ram_size]
    finally:
        vm.close()
