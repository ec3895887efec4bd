"""A guest reboot resets the board in place (issue 13): devices and harts are reset and the
guest loaded again, while the host backends survive -- the same passt process and the same
console-port socket -- and the rebooted guest has its disk and its network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.backends.net import PasstBackend
from pyvirt.request import request, resolve
from pyvirt.vmm.vm import Vm, Watch

pytestmark = pytest.mark.slow

# First boot: network up, MARK onto the disk, reboot.  Second boot: MARK found, network up
# again, exit 0 (the VM powers off with the command's status).
GUEST = ("ip -4 addr show eth0 | grep -q 'inet ' || exit 9; "
         "if dd if=/dev/vda bs=4 count=1 2>/dev/null | grep -q MARK; then echo SECOND-BOOT; exit 0; fi; "
         "echo -n MARK | dd of=/dev/vda conv=notrunc 2>/dev/null; sync; echo FIRST-BOOT; reboot -f")


def _inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_a_reboot_keeps_the_host_backends(default_image, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    port = tmp_path / "probe.sock"
    r = resolve(request(memory="128M", disks=[str(disk)], nets=["user"], vports=[f"probe={port}"],
                        command=GUEST))
    out = BufferBackend()
    vm = Vm(r.spec, out)
    try:
        board = vm.board
        passt = board.host.nets[0]
        assert isinstance(passt, PasstBackend) and passt.proc is not None
        probe = dict(board.host.named_ports)["probe"]
        before = (passt.proc.pid, _inode(passt.stream.fileno()), _inode(probe.server.fileno()),
                  port.stat().st_ino)
        seen: list[tuple[int, int, int, int, int]] = []

        def sample() -> None:         # between slices, on both boots
            assert passt.proc is not None
            seen.append((vm.stats.resets, passt.proc.pid, _inode(passt.stream.fileno()),
                         _inode(probe.server.fileno()), port.stat().st_ino))
        vm.watches.append(Watch(list, lambda _ready: None, on_tick=sample))
        code = vm.run(timeout=600)
        text = out.output.decode(errors="replace")
        assert code == 0, text[-2000:]
        assert text.count("FIRST-BOOT") == 1 and "SECOND-BOOT" in text, text[-2000:]
        assert vm.stats.resets == 1 and vm.board is board
        after_reboot = {s[1:] for s in seen if s[0] == 1}
        assert after_reboot == {before}, (before, after_reboot)
        assert passt.proc.poll() is None                       # still running: never restarted
        # the guest's disk write of the first boot is on the disk
        assert disk.read_bytes()[:4] == b"MARK"
    finally:
        vm.close()
