"""The Debian guest: Debian trixie with systemd booted from its disk by Debian's kernel.

The image is built by `make test` (`pyvirt image build debian`) before the suite
runs; these tests only find it in the cache.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import pytest

from pyvirt.images.debian_image import DebianImage, cached_debian_image
from pyvirt.testing.guest import PtyConsole, pyvirt

BOOT_TIMEOUT = 900


@pytest.fixture(scope="module")
def debian() -> DebianImage:
    img = cached_debian_image()
    if img is None:
        pytest.fail("the Debian image is not built: `make test` runs `pyvirt image build debian` first")
    return img


@pytest.mark.timeout(3 * BOOT_TIMEOUT)
def test_command_sees_debian_13_and_root_disk_persists(debian: DebianImage, tmp_path: Path) -> None:
    """The acceptance command (os-release says Debian 13, systemd's boot ended well) on
    Debian's own kernel with its modules; --root-disk keeps a write for the next boot, which
    also passes a failing command's exit status through."""
    root = tmp_path / "root.qcow2"
    before = debian.disk.stat().st_mtime_ns
    r = pyvirt("run", "--image", "debian", "--root-disk", str(root), "--command",
               "cat /etc/os-release; systemctl is-system-running; systemctl --failed --no-legend; "
               "uname -r; lsmod | grep -c -E '^(ext4|virtio_blk|virtio_mmio) '; "
               "echo kept-$((6*7)) > /root/mark && sync", timeout=BOOT_TIMEOUT)
    assert 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"' in r.out, (r.out[-2000:], r.err[-2000:])
    assert 'VERSION_ID="13"' in r.out
    assert r.out.startswith('PRETTY_NAME='), repr(r.out[:200])      # nothing before the command's output
    assert "\r" not in r.out                                        # byte for byte, no \r added
    lines = r.out.splitlines()
    state = next(line for line in lines if line in ("running", "degraded", "starting", "maintenance"))
    assert state == "running", f"systemd is {state}; failed units: {r.out[-1000:]}"
    assert any(line.endswith("-riscv64") for line in lines) and "3" in lines
    assert r.code == 0, r.err[-1000:]

    r = pyvirt("run", "--image", "debian", "--root-disk", str(root), "--command", "cat /root/mark; exit 7",
               timeout=BOOT_TIMEOUT)
    assert r.code == 7 and r.out.strip() == "kept-42", (r.out[-1500:], r.err[-1500:])
    assert debian.disk.stat().st_mtime_ns == before           # the cached base is never written


@pytest.mark.timeout(2 * BOOT_TIMEOUT)
def test_console_login_as_root(debian: DebianImage) -> None:
    """The documented login: systemd's getty on the serial console, root without a password."""
    vm = PtyConsole("--image", "debian", timeout=BOOT_TIMEOUT)
    try:
        vm.expect(rb"debian login: ")
        vm.send(b"root\r")
        vm.expect(rb"root@debian:~# ")
        vm.send(b"cat /etc/debian_version; systemctl is-system-running\r")
        vm.expect(rb"\r13\.\d+\r\n(running|degraded)\r\n")     # after bash's bracketed-paste off: ESC[?2004l\r
        assert b"running" in vm.buf[-200:], vm.buf[-800:]
        vm.send(b"poweroff\r")
        end = time.monotonic() + 300
        while time.monotonic() < end:
            done, status = os.waitpid(vm.pid, os.WNOHANG)
            if done:
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                break
            try:
                if select.select([vm.fd], [], [], 1)[0]:
                    vm.buf += os.read(vm.fd, 4096)
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"poweroff did not end the VM: {vm.buf[-800:]!r}")
    finally:
        vm.kill()


@pytest.mark.timeout(BOOT_TIMEOUT + 60)
@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/lib/qemu/virtiofsd", os.X_OK),
                    reason="virtiofsd (and root) needed")
def test_a_shared_folder_is_mounted_by_systemd(debian: DebianImage, tmp_path: Path) -> None:
    """--share on the Debian guest: systemd mounts it on /mnt/TAG (a mount unit from the
    kernel's systemd.mount-extra=, the virtiofs module loaded on demand), both ways."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "a").write_text("debian sees it\n")
    r = pyvirt("run", "--image", "debian", "--share", f"{share}:work", "--command",
               "cat /mnt/work/a; findmnt -n -o FSTYPE /mnt/work; echo from-debian > /mnt/work/b",
               timeout=BOOT_TIMEOUT)
    assert r.code == 0, r.err
    assert "debian sees it" in r.out and "virtiofs" in r.out
    assert (share / "b").read_text() == "from-debian\n"
