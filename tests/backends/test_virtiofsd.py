"""The virtio-fs device with the real virtiofsd behind it, driven by the mock driver (no
guest kernel): FUSE requests posted on the request queue are answered by virtiofsd through
the shared memfd, the call eventfd raises the interrupt, and the page a READ filled has its
translated code dropped and is marked dirty; `,ro` refuses a create on the host side."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from pyvirt.backends.virtiofsd import VIRTIOFSD, Virtiofsd
from pyvirt.devices.base import IrqLine
from pyvirt.devices.virtio.fs import VirtioFs
from pyvirt.devices.virtio.mmio import VirtioMmio
from pyvirt.errors import ConfigError
from pyvirt.memory import Bus, shared_ram
from pyvirt.testing.virtq import Buffer, MockQueue, MockVirtioDriver

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd needs root"),
              pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK), reason="no virtiofsd")]

RAM, RAM_SIZE, MMIO = 0x8000_0000, 8 << 20, 0x1000_1000
FUSE_LOOKUP, FUSE_OPEN, FUSE_READ, FUSE_CREATE, FUSE_INIT = 1, 14, 15, 35, 26
_IN = struct.Struct("<IIQQIIIHH")          # fuse_in_header
_OUT = struct.Struct("<IiQ")               # fuse_out_header


class Fuse:
    """A FUSE client in miniature over the device's request queue."""

    def __init__(self, drv: MockVirtioDriver, q: MockQueue, dev: VirtioFs) -> None:
        self.drv, self.q, self.dev, self.unique = drv, q, dev, 0

    def call(self, opcode: int, nodeid: int, body: bytes, out_size: int) -> tuple[int, bytes, Buffer]:
        self.unique += 1
        req = _IN.pack(_IN.size + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0) + body
        out = Buffer(self.drv.alloc(max(out_size, 4096), 4096), _OUT.size + out_size, True)
        head = self.q.add([self.drv.buffer(req), out])
        self.drv.kick(1)
        # As a driver does: the interrupt means "look at the used ring", not "the reply is
        # there" -- virtiofsd signals each call eventfd once as it is handed over
        # (SET_VRING_CALL), so the first interrupt can come before any reply has.
        used: list[tuple[int, int]] = []
        end = time.monotonic() + 10
        while not used:
            assert time.monotonic() < end, "virtiofsd did not answer"
            time.sleep(0.005)
            self.dev.poll()
            if self.drv.interrupt_status() & 1:
                self.drv.ack_interrupt()
                used = self.q.used_entries()
        length, error, unique = _OUT.unpack(self.drv.read(out, _OUT.size))
        assert used == [(head, length)]         # this request, its reply's length written
        assert unique == self.unique
        return error, self.drv.read(out, length)[_OUT.size:], out


def rig(share: Path, read_only: bool) -> Any:
    fsd = Virtiofsd(share, "work", read_only)
    ram, fd = shared_ram(RAM_SIZE)
    bus = Bus(RAM, RAM_SIZE, ram, fd)
    assert fsd.front is not None
    dev = VirtioFs(fsd.front, "work", fd)
    bus.add_mmio(MMIO, VirtioMmio.SIZE, VirtioMmio(dev, bus, IrqLine()), "virtio0")
    drv = MockVirtioDriver(bus, MMIO)
    qs = drv.init(queues=2)
    fuse = Fuse(drv, qs[1], dev)
    try:
        error, _, _ = fuse.call(FUSE_INIT, 0, struct.pack("<IIII", 7, 31, 0, 0), 64)
        assert error == 0
    except BaseException:
        dev.close()
        fsd.close()
        bus.close()
        raise
    return fsd, bus, dev, fuse


def test_virtiofsd_reads_a_file_into_guest_ram_coherently(tmp_path: Path) -> None:
    (tmp_path / "hello").write_bytes(b"new code" * 512)
    fsd, bus, dev, fuse = rig(tmp_path, read_only=False)
    try:
        error, entry, _ = fuse.call(FUSE_LOOKUP, 1, b"hello\0", 128)
        assert error == 0
        nodeid = struct.unpack_from("<Q", entry)[0]
        assert struct.unpack_from("<Q", entry, 40 + 8)[0] == 4096          # attr.size
        error, opened, _ = fuse.call(FUSE_OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0), 16)
        assert error == 0
        fh = struct.unpack_from("<Q", opened)[0]
        bus.start_dirty_log()
        seen: list[int] = []
        # the page the reply will land in holds "translated code": its watcher must fire
        nxt = (fuse.drv.mem.next + 4095) & ~4095
        for page in range(nxt >> 12, (nxt >> 12) + 4):
            bus.watch(page, lambda a, n, p=page: seen.append(p))
        error, data, out = fuse.call(FUSE_READ, nodeid, struct.pack("<QQIIQII", fh, 0, 4096, 0, 0, 0, 0), 4096)
        assert error == 0 and data == b"new code" * 512
        assert (out.addr >> 12) in seen                        # translated code dropped
        assert ((out.addr - RAM) >> 12) in bus.harvest_dirty()  # marked for snapshots/migration
        assert dev.pages_marked >= 4096
    finally:
        dev.close()
        fsd.close()
        bus.close()


def test_a_read_only_share_refuses_a_create_on_the_host(tmp_path: Path) -> None:
    fsd, bus, dev, fuse = rig(tmp_path, read_only=True)
    try:
        body = struct.pack("<IIII", os.O_WRONLY | os.O_CREAT, 0o644, 0o022, 0) + b"made\0"
        error, _, _ = fuse.call(FUSE_CREATE, 1, body, 128 + 16)
        assert error == -30                                    # EROFS, from the host
        assert list(tmp_path.iterdir()) == []
    finally:
        dev.close()
        fsd.close()
        bus.close()


def test_virtiofsd_ends_with_the_vm(tmp_path: Path) -> None:
    fsd = Virtiofsd(tmp_path, "work", False)
    proc = fsd.proc
    assert proc is not None and proc.poll() is None
    fsd.close()
    assert proc.poll() is not None and not fsd.dir.exists()


def test_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        Virtiofsd(tmp_path / "missing", "work", False)


def test_a_hostile_driver_cannot_look_outside_the_share(tmp_path: Path) -> None:
    """What a hostile guest kernel can send, past its own path resolution: LOOKUP of `..` on
    the share's root, a name with a slash, a walk through a symbolic link to a host
    directory -- none reaches the file beside the share."""
    share = tmp_path / "share"
    share.mkdir()
    (tmp_path / "secret").write_text("TOPSECRET")
    (share / "out").symlink_to(tmp_path)
    fsd, bus, dev, fuse = rig(share, read_only=False)
    try:
        error, entry, _ = fuse.call(FUSE_LOOKUP, 1, b"..\0", 128)
        up = struct.unpack_from("<Q", entry)[0] if error == 0 else None
        if up is not None:                      # `..` of the root is the root itself
            error, _, _ = fuse.call(FUSE_LOOKUP, up, b"secret\0", 128)
            assert error == -2                  # ENOENT
        for name in (b"../secret\0", b"out/secret\0"):
            error, _, _ = fuse.call(FUSE_LOOKUP, 1, name, 128)
            assert error < 0, name
        error, entry, _ = fuse.call(FUSE_LOOKUP, 1, b"out\0", 128)  # the link itself, not followed
        assert error == 0
        mode = struct.unpack_from("<I", entry, 40 + 60)[0]          # fuse_attr.mode
        assert mode & 0o170000 == 0o120000                          # S_IFLNK
        link = struct.unpack_from("<Q", entry)[0]
        error, _, _ = fuse.call(FUSE_LOOKUP, link, b"secret\0", 128)
        assert error < 0                                            # a link is no directory
    finally:
        dev.close()
        fsd.close()
        bus.close()
