"""Disk copy during a live migration (vmm/migration.py, `copy_storage`): a raw disk and a qcow2
disk over a backing file arrive at the destination as new images in its own directory with
every byte the guest sees -- written before the migration, during the bulk copy and during
the last rounds -- the qcow2 flattened and clean by `qemu-img check`; the dirty-block bitmap
marks every kind of change; a hostile source cannot make the destination write outside its
directory, over an existing file, past a disk's end or beyond its free space, and a failed
copy leaves no image behind while the source runs on with its disks as they were."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from pyvirt.backends.block import RawFileBackend
from pyvirt.backends.char import BufferBackend
from pyvirt.backends.dirty import BLOCK, DirtyBlocks, TrackedBackend
from pyvirt.backends.disk import open_disk
from pyvirt.backends.qcow2_tools import create_qcow2
from pyvirt.machine.boot import IMAGE_MAGIC2
from pyvirt.spec import DiskSpec, make_spec
from pyvirt.testing.migrate import guest_view
from pyvirt.vmm import migration as mig
from pyvirt.vmm.migration import MigrationError
from pyvirt.vmm.vm import Vm, Watch

ZSTD = zstandard.ZstdCompressor()
DISK = 4 << 20


def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "k"
    # An Image whose first instruction jumps to itself: a guest that runs for ever.
    k.write_bytes(b"\x6f\x00\x00\x00" + bytes(52) + IMAGE_MAGIC2 + bytes(4))
    return k


def disks(tmp_path: Path) -> list[Path]:
    """A raw disk with data here and there, and a qcow2 over a raw backing file, some of its
    blocks its own, some the backing file's."""
    src = tmp_path / "src"
    src.mkdir()
    raw = src / "a.raw"
    with open(raw, "wb") as f:
        f.truncate(DISK)
        for off in (0, 5 * BLOCK + 100, DISK - 512):
            f.seek(off)
            f.write(os.urandom(512))
    base = src / "base.raw"
    with open(base, "wb") as f:
        f.truncate(DISK)
        f.seek(3 * BLOCK)
        f.write(os.urandom(3 * BLOCK))
    top = src / "top.qcow2"
    create_qcow2(top, None, backing=base, backing_format="raw")
    q = open_disk(top, fmt="qcow2")
    q.write(4 * BLOCK + 4096, os.urandom(8192))          # over the backing file's data
    q.write(40 * BLOCK, os.urandom(BLOCK))
    q.close()
    return [raw, top]


def blk_backends(vm: Vm) -> list[Any]:
    return [t.device.backend for _, _, t in vm.board.virtio if hasattr(t.device, "backend")]


def migrate_with_disks(tmp_path: Path, writes: Callable[[Vm, int], None] | None = None, ro: bool = False,
                       **kw: Any) -> tuple[mig.Migration, Any, Path, Vm]:
    """Migrate a VM with the two disks to a real destination (`receive` in a thread, its
    disk directory dest/); `writes(vm, tick)` changes the disks between slices.  (the
    migration, the destination's Vm or error, the destination directory, the source Vm)."""
    paths = disks(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    vm = Vm(make_spec(kernel=kernel(tmp_path), memory=16 << 20,      # (`ro`: the raw one read-only)
                      disks=[DiskSpec(path=p, read_only=ro and i == 0) for i, p in enumerate(paths)]),
            BufferBackend())
    a, b = socket.socketpair()
    got: list[Any] = []

    def destination() -> None:
        try:
            got.append(mig.receive(b, "t", BufferBackend(), timeout=10, disk_dir=dest))
        except MigrationError as e:
            got.append(e)
        b.close()
    t = threading.Thread(target=destination)
    t.start()
    m = mig.Migration(vm, a, "t", copy_storage=True, **kw)
    ticks = [0]

    def each() -> None:
        ticks[0] += 1
        if writes is not None and not m.done:
            writes(vm, ticks[0])
        if m.done:
            vm.request_quit()
    vm.watches.append(Watch(lambda: [], lambda ready: None, each))
    m.attach()
    vm.run(timeout=60)
    t.join(30)
    return m, got[0], dest, vm


def test_dirty_blocks_mark_every_change(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(10 * BLOCK + 512))
    tracked = TrackedBackend(RawFileBackend(path))
    try:
        assert tracked.log.count == 11 and tracked.size == 10 * BLOCK + 512
        tracked.write(BLOCK - 1, b"ab")                        # straddles blocks 0 and 1
        tracked.writev(3 * BLOCK, [memoryview(b"x" * 512)])
        tracked.discard(5 * BLOCK, 2 * BLOCK)
        tracked.write(10 * BLOCK, b"z" * 512)                  # the short last block
        assert tracked.log.harvest() == [0, 1, 3, 5, 6, 10]
        assert tracked.log.harvest() == []
        assert not hasattr(tracked, "write_zeroes")             # the raw backend has none: nor does its tracker
    finally:
        tracked.close()
    q = tmp_path / "q.qcow2"
    create_qcow2(q, 8 * BLOCK)
    tq = TrackedBackend(open_disk(q, fmt="qcow2"))
    try:
        tq.write_zeroes(2 * BLOCK, 512)
        assert tq.log.harvest() == [2]
    finally:
        tq.close()
    log = DirtyBlocks(100 * BLOCK)
    log.mark(99 * BLOCK, 10 * BLOCK)                           # clipped at the end
    log.mark(0, 0)
    assert log.harvest() == [99]


def guest_writes(marks: list[tuple[int, int, bytes]]) -> Callable[[Vm, int], None]:
    """A 4 KiB write to one disk or the other every third tick (60 at most), noted in `marks`."""

    def writes(vm: Vm, tick: int) -> None:
        if tick % 3 == 0 and len(marks) < 60:
            blk = blk_backends(vm)
            disk = tick % 2
            off = (tick * 7919 * 512) % (DISK - 4096)
            data = os.urandom(4096)
            blk[disk].write(off, data)
            marks.append((disk, off, data))
    return writes


def test_disks_arrive_with_every_write_flattened_and_clean(tmp_path: Path) -> None:
    """Writes during the bulk copy and the rounds after it all arrive; the backing file does
    not go along: the qcow2 arrives flattened, checked by qemu-img."""
    marks: list[tuple[int, int, bytes]] = []
    m, got, dest, vm = migrate_with_disks(tmp_path, guest_writes(marks), downtime=0.001)
    try:
        assert m.stats.outcome == "completed", m.stats
        assert not isinstance(got, Exception), got
        assert m.stats.blocks_sent > 0 and len(marks) >= 2, (m.stats, len(marks))
        got.close()
        src = [Path(d.path) for d in vm.spec.disks]
        assert sorted(p.name for p in dest.iterdir()) == ["disk0.raw", "disk1.qcow2"]
        vm.close()
        for i, (s, d) in enumerate(zip(src, [dest / "disk0.raw", dest / "disk1.qcow2"])):
            want = guest_view(s)
            assert hashlib.sha256(guest_view(d, d.suffix[1:])).digest() == hashlib.sha256(want).digest(), i
            for disk, off, data in marks:
                if disk == i:
                    assert want[off:off + len(data)] == data
        assert json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(dest / "disk1.qcow2")],
                                         capture_output=True, text=True, check=True).stdout).get(
            "backing-filename") is None
        if shutil.which("qemu-img"):
            r = subprocess.run(["qemu-img", "check", str(dest / "disk1.qcow2")], capture_output=True, text=True)
            assert r.returncode == 0, r.stdout + r.stderr
            flat = tmp_path / "flat.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(dest / "disk1.qcow2"), str(flat)], check=True)
            assert flat.read_bytes() == guest_view(src[1])
    finally:
        vm.close()


def test_a_read_only_disk_is_copied_too(tmp_path: Path) -> None:
    """A disk the guest may only read is copied like the others (written on the destination
    through the copy's own backends, the board built after) and stays read-only there."""
    marks: list[tuple[int, int, bytes]] = []

    def writes(vm: Vm, tick: int) -> None:                  # (to the writable qcow2 only)
        if tick % 3 == 0 and len(marks) < 30:
            off = (tick * 7919 * 512) % (DISK - 4096)
            data = os.urandom(4096)
            blk_backends(vm)[1].write(off, data)
            marks.append((1, off, data))
    m, got, dest, vm = migrate_with_disks(tmp_path, writes, ro=True, downtime=0.001)
    try:
        assert m.stats.outcome == "completed" and not isinstance(got, Exception), (m.stats, got)
        assert [b.read_only for b in got.board.backends] == [True, False]
        got.close()
        src = [Path(d.path) for d in vm.spec.disks]
        vm.close()
        assert guest_view(dest / "disk0.raw", "raw") == guest_view(src[0])
        assert guest_view(dest / "disk1.qcow2", "qcow2") == guest_view(src[1]) and marks
    finally:
        vm.close()


def test_a_muted_bitmap_loses_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above can fail: with the bitmap marking nothing, writes made after their
    block was sent are missing at the destination."""
    monkeypatch.setattr(DirtyBlocks, "mark", lambda self, offset, length: None)
    marks: list[tuple[int, int, bytes]] = []
    m, got, dest, vm = migrate_with_disks(tmp_path, guest_writes(marks), downtime=0.001)
    try:
        assert m.stats.outcome == "completed" and not isinstance(got, Exception), m.stats
        got.close()
        views = [guest_view(dest / "disk0.raw", "raw"), guest_view(dest / "disk1.qcow2", "qcow2")]
        lost = [(d, off) for d, off, data in marks if views[d][off:off + len(data)] != data]
        assert lost, "every write arrived without the bitmap"
    finally:
        vm.close()


def test_a_destination_gone_during_the_copy_leaves_the_source_as_it_was(tmp_path: Path) -> None:
    """The destination refuses a block midway (it is killed the same way in tests/host): the
    source runs on, its disks back to their own backends, untracked, and the destination's
    directory holds nothing."""
    paths = disks(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    vm = Vm(make_spec(kernel=kernel(tmp_path), memory=16 << 20,
                      disks=[DiskSpec(path=p) for p in paths]), BufferBackend())
    before = blk_backends(vm)
    a, b = socket.socketpair()

    def destination() -> None:                  # the handshake, two BLOCKS frames, then gone
        greeting: dict[str, Any] = {}
        spec = mig.accept_handshake(b, "t", lambda s, c: mig.default_accept(s, c, dest), greeting=greeting)
        d = mig.DiskReceiver(spec, greeting["disks"])
        d.writers = [open_disk(x.path, fmt=x.format) for x in spec.disks]
        try:
            mig.recv_frame(b, (mig.CODE,))      # (the source's translated blocks come first)
            for _ in range(2):
                d.apply(mig.recv_frame(b, (mig.BLOCKS,))[1])
        finally:
            for w in d.writers:
                w.close()
            d.abort()
            b.close()
    t = threading.Thread(target=destination)
    t.start()
    m = mig.Migration(vm, a, "t", copy_storage=True, downtime=0.001)
    vm.watches.append(Watch(lambda: [], lambda ready: None, lambda: m.done and vm.request_quit()))
    try:
        m.attach()
        vm.run(timeout=30)
        t.join(10)
        assert m.stats.outcome == "failed" and m.stats.blocks_sent >= 2, m.stats
        assert blk_backends(vm) == before and not any(isinstance(x, TrackedBackend) for x in vm.board.backends)
        assert list(dest.iterdir()) == []
        vm.quit_requested = False
        ran = vm.stats.instructions
        vm.run(max_instructions=ran + 100_000)
        assert vm.stats.instructions > ran
    finally:
        vm.close()


# -- a hostile source ----------------------------------------------------------------------
def spec_with_disks(tmp_path: Path, n: int = 1) -> dict[str, Any]:
    spec = make_spec(kernel=kernel(tmp_path), memory=16 << 20)
    out = json.loads(spec.model_dump_json())
    out["disks"] = [{"path": f"/etc/passwd{i}", "read_only": False, "format": "raw"} for i in range(n)]
    return out


def frame(kind: int, payload: bytes = b"") -> bytes:
    return mig.HEADER.pack(kind, len(payload)) + payload


def blocks(disk: int, *items: tuple[int, bytes | None], count: int | None = None) -> bytes:
    body = struct.pack("<BI", disk, len(items) if count is None else count)
    body += b"".join(struct.pack("<QB", b, d is None) for b, d in items)
    body += b"".join(d for _, d in items if d is not None)
    return ZSTD.compress(body)


def declare(size: int = BLOCK * 4, fmt: str = "raw", allocated: int = 0) -> dict[str, Any]:
    return {"format": fmt, "size": size, "allocated": allocated}


def serve(tmp_path: Path, decl: list[dict[str, Any]], rest: bytes, n: int = 1,
          disk_dir: Path | None | str = "dest") -> Any:
    spec = spec_with_disks(tmp_path, n)
    a, b = socket.socketpair()
    hello = {"protocol": mig.PROTOCOL, "version": mig.VERSION, "token": "t", "disks": decl}

    def source() -> None:
        try:
            b.sendall(frame(mig.HELLO, json.dumps(hello).encode()) + frame(mig.SPEC, json.dumps(spec).encode())
                      + rest)
            b.shutdown(socket.SHUT_WR)
            while mig.recv_frame(b, tuple(mig.NAMES), 1 << 20):
                pass
        except (MigrationError, OSError):
            pass
        finally:
            b.close()
    t = threading.Thread(target=source)
    t.start()
    where = tmp_path / "dest" if disk_dir == "dest" else disk_dir
    try:
        result: Any = mig.receive(a, "t", BufferBackend(), timeout=5,
                                  disk_dir=where if isinstance(where, Path) or where is None else None)
    except MigrationError as e:
        result = e
    a.close()
    t.join(10)
    return result


BAD: dict[str, tuple[list[dict[str, Any]], Callable[[], bytes], str]] = {
    "too large": ([declare(size=(1 << 40) + 512)], lambda: b"", "this host takes whole sectors up to 1024 GiB"),
    "not whole sectors": ([declare(size=1000)], lambda: b"", "this host takes whole sectors"),
    "unknown format": ([declare(fmt="vmdk")], lambda: b"", "not {format: raw|qcow2"),
    "more than it has": ([declare(), declare()], lambda: b"", "2 disks declared for a VM with 1 disks"),
    "no room": ([declare(size=1 << 40, allocated=1 << 40)], lambda: b"", "no room for the disks here"),
    "block past the end": ([declare()], lambda: frame(mig.BLOCKS, blocks(0, (4, b"a" * BLOCK))),
                           "block 4 is outside disk 0's 4 blocks"),
    "another disk": ([declare()], lambda: frame(mig.BLOCKS, blocks(1, (0, b"a" * BLOCK))),
                     "disk 1 is not one of the 1 copied"),
    "short data": ([declare()], lambda: frame(mig.BLOCKS, blocks(0, (0, b"a" * 100))), "does not match its count"),
    "count lies": ([declare()], lambda: frame(mig.BLOCKS, blocks(0, (0, b"a" * BLOCK), count=200)),
                   "does not match its count"),
    "corrupted": ([declare()], lambda: frame(mig.BLOCKS, blocks(0, (0, b"a" * BLOCK))[:-9] + b"\x00" * 9),
                  "bad migration stream"),
    "truncated": ([declare()], lambda: frame(mig.BLOCKS, blocks(0, (0, os.urandom(BLOCK))))[:-50], "truncated"),
    "blocks without a copy": ([], lambda: frame(mig.BLOCKS, blocks(0, (0, b"a" * BLOCK))), "frame type 11"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_hostile_disk_copy_is_refused_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    decl, rest, why = BAD[case]
    (tmp_path / "dest").mkdir()
    n = 0 if case == "blocks without a copy" else 1
    err = serve(tmp_path, decl, rest() + frame(mig.COMPLETE), n=n, disk_dir=tmp_path / "dest")
    assert isinstance(err, MigrationError), err
    assert why in str(err) and "\n" not in str(err), err
    assert list((tmp_path / "dest").iterdir()) == []
    assert Path("/etc/passwd0").exists() is False


def test_a_destination_without_a_disk_directory_takes_no_copy(tmp_path: Path) -> None:
    err = serve(tmp_path, [declare()], b"", disk_dir=None)
    assert isinstance(err, MigrationError) and "takes no disk copies" in str(err)


def test_an_existing_file_or_link_in_the_way_is_never_written(tmp_path: Path) -> None:
    """The destination makes each image new (O_EXCL): a file or a link already at its name is
    refused and kept as it was."""
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    (dest / "disk0.raw").symlink_to(outside)
    err = serve(tmp_path, [declare()], frame(mig.BLOCKS, blocks(0, (0, b"a" * BLOCK))) + frame(mig.COMPLETE))
    assert isinstance(err, MigrationError) and "cannot make the copied disks here" in str(err), err
    assert outside.read_bytes() == b"keep" and (dest / "disk0.raw").is_symlink()
    (dest / "disk0.raw").unlink()
    (dest / "disk0.qcow2").write_bytes(b"mine")
    err = serve(tmp_path, [declare(fmt="qcow2")], frame(mig.COMPLETE))
    assert isinstance(err, MigrationError) and "already exists" in str(err), err
    assert (dest / "disk0.qcow2").read_bytes() == b"mine"


def cold_pair(tmp_path: Path, paths: list[Path], play: Callable[[socket.socket], None] | None = None) -> Any:
    """A cold move of a VM with `paths` as disks: `send_cold` (or `play`, a hostile source)
    against the destination's `receive_cold` into dest/; the error or None."""
    spec = json.loads(make_spec(kernel=kernel(tmp_path), memory=16 << 20,
                                disks=[DiskSpec(path=p) for p in paths]).model_dump_json())
    (tmp_path / "dest").mkdir(exist_ok=True)
    a, b = socket.socketpair()

    def source() -> None:
        opened = [open_disk(p, read_only=True) for p in paths]
        try:
            if play is not None:
                play(b)
            else:
                mig.send_cold(b, "t", spec, opened)
        except MigrationError:
            pass
        finally:
            for d in opened:
                d.close()
            b.close()
    t = threading.Thread(target=source)
    t.start()
    greeting: dict[str, Any] = {}
    try:
        got = mig.accept_handshake(a, "t", lambda s, c: mig.default_accept(s, c, tmp_path / "dest"),
                                   greeting=greeting)
        assert greeting["cold"]
        mig.receive_cold(a, got, greeting["disks"])
        result: Any = None
    except MigrationError as e:
        result = e
    a.close()
    t.join(10)
    return result


def test_a_cold_move_copies_the_disks_flattened(tmp_path: Path) -> None:
    paths = disks(tmp_path)
    assert cold_pair(tmp_path, paths) is None
    dest = tmp_path / "dest"
    assert sorted(p.name for p in dest.iterdir()) == ["disk0.raw", "disk1.qcow2"]
    assert guest_view(dest / "disk0.raw", "raw") == guest_view(paths[0])
    assert guest_view(dest / "disk1.qcow2", "qcow2") == guest_view(paths[1])
    if shutil.which("qemu-img"):
        r = subprocess.run(["qemu-img", "check", str(dest / "disk1.qcow2")], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_hostile_cold_move_leaves_no_image(tmp_path: Path) -> None:
    paths = disks(tmp_path)
    spec = json.loads(make_spec(kernel=kernel(tmp_path), memory=16 << 20,
                                disks=[DiskSpec(path=p) for p in paths]).model_dump_json())
    hello = {"protocol": mig.PROTOCOL, "version": mig.VERSION, "token": "t", "cold": True,
             "disks": [declare(DISK), declare(DISK, "qcow2")]}

    def play(s: socket.socket) -> None:
        s.sendall(frame(mig.HELLO, json.dumps(hello).encode()) + frame(mig.SPEC, json.dumps(spec).encode())
                  + frame(mig.BLOCKS, blocks(1, (0, b"a" * BLOCK)))
                  + frame(mig.BLOCKS, blocks(0, (DISK // BLOCK, b"a" * BLOCK))) + frame(mig.COMPLETE))
        while mig.recv_frame(s, tuple(mig.NAMES), 1 << 20):
            pass
    err = cold_pair(tmp_path, paths, play)
    assert isinstance(err, MigrationError) and "outside disk 0's 64 blocks" in str(err), err
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_block_sent_then_zeroed_reads_as_zeros(tmp_path: Path, fmt: str) -> None:
    """A block whose data went in one round and that the guest zeroed before the next (a zero
    flag) reads as zeros on the destination; its neighbours keep their data."""
    from pyvirt.state import encode_bytes
    from pyvirt.vmm.resources import build_board
    src = tmp_path / f"src.{fmt}"
    if fmt == "raw":
        src.write_bytes(bytes(4 * BLOCK))
    else:
        create_qcow2(src, 4 * BLOCK)
    spec = make_spec(kernel=kernel(tmp_path), memory=16 << 20, disks=[DiskSpec(path=src, format=fmt)])
    board = build_board(spec, BufferBackend())
    try:
        state = json.dumps(board.save_state(), default=encode_bytes).encode()
    finally:
        board.close()
    (tmp_path / "dest").mkdir()
    one, two = os.urandom(BLOCK), os.urandom(BLOCK)
    hello = {"protocol": mig.PROTOCOL, "version": mig.VERSION, "token": "t", "disks": [declare(4 * BLOCK, fmt)]}
    a, b = socket.socketpair()

    def source() -> None:
        b.sendall(frame(mig.HELLO, json.dumps(hello).encode()) + frame(mig.SPEC, spec.model_dump_json().encode())
                  + frame(mig.BLOCKS, blocks(0, (1, one), (2, two))) + frame(mig.BLOCKS, blocks(0, (1, None)))
                  + frame(mig.STATE, ZSTD.compress(state)) + frame(mig.COMPLETE))
        for kind in (mig.OK, mig.OK, mig.READY):
            mig.recv_frame(b, (kind,))
        b.sendall(frame(mig.GO))
        b.close()
    t = threading.Thread(target=source)
    t.start()
    vm = mig.receive(a, "t", BufferBackend(), timeout=10, disk_dir=tmp_path / "dest")
    t.join(10)
    a.close()
    vm.close()
    view = guest_view(tmp_path / "dest" / f"disk0.{fmt}", fmt)
    assert view[BLOCK:2 * BLOCK] == bytes(BLOCK) and view[2 * BLOCK:3 * BLOCK] == two
    assert view[:BLOCK] == bytes(BLOCK) == view[3 * BLOCK:]
