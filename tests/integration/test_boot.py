"""Boot the default guest and drive it: the acceptance checks of the foundation issue."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from pyvirt.testing.guest import PtyConsole, pyvirt

pytestmark = pytest.mark.slow


def test_command_output_and_status(default_image, every_engine: str) -> None:
    r = pyvirt("run", "--engine", every_engine, "--command", "cat /proc/cpuinfo; uname -m; echo $((6*7))")
    assert r.code == 0, r.err
    assert "processor\t: 0" in r.out
    assert "isa\t\t: rv64imafdc" in r.out
    lines = r.out.splitlines()
    assert lines[-2:] == ["riscv64", "42"]


def test_command_exit_status(default_image, engine: str) -> None:
    r = pyvirt("run", "--engine", engine, "--command", "echo bye; exit 3")
    assert r.code == 3
    assert r.out == "bye\n"


def test_four_cpus_online(default_image, every_engine: str) -> None:
    r = pyvirt("run", "--engine", every_engine, "--cpus", "4", "--command",
               "grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online")
    assert r.code == 0, r.err
    assert r.out.split() == ["4", "0-3"]


def test_interactive_console_reaches_prompt(default_image) -> None:
    """What `make run` does: a shell prompt on the console, Ctrl-A x quits."""
    vm = PtyConsole(timeout=300)
    try:
        vm.expect(rb"root@pyvirt:[^\r\n]*# ")
        vm.send(b"uname -m\r")
        vm.expect(rb"riscv64\r\n")
        vm.send(b"\x01x")                       # Ctrl-A x
        _, status = os.waitpid(vm.pid, 0)
        assert os.WIFEXITED(status)
    finally:
        vm.kill()


def _mkfs(path: Path, files: dict[str, bytes], size_mb: int = 16) -> None:
    root = path.parent / (path.name + ".d")
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), str(path), f"{size_mb}M"], check=True,
                   env=dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000"))


def _debugfs_cat(image: Path, name: str) -> bytes:
    p = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True, check=True)
    return p.stdout


def test_disk_write_survives_poweroff(default_image, every_engine: str, tmp_path: Path) -> None:
    img = tmp_path / "data.img"
    _mkfs(img, {"hello.txt": b"from the host\n"})
    r = pyvirt("run", "--engine", every_engine, "--disk", str(img), "--command",
               "mount /dev/vda /mnt && cat /mnt/hello.txt && echo written-in-guest > /mnt/new.txt "
               "&& sync && umount /mnt")
    assert r.code == 0, r.out + r.err
    assert "from the host" in r.out
    assert _debugfs_cat(img, "new.txt") == b"written-in-guest\n"
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout


def test_mkfs_in_guest(default_image, tmp_path: Path) -> None:
    img = tmp_path / "blank.img"
    img.write_bytes(bytes(8 << 20))
    r = pyvirt("run", "--disk", str(img), "--command",
               "mke2fs -q /dev/vda && mount /dev/vda /mnt && echo made-here > /mnt/f && umount /mnt && sync")
    assert r.code == 0, r.out + r.err
    assert _debugfs_cat(img, "f") == b"made-here\n"


def test_read_only_disk_refuses_writes(default_image, tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    _mkfs(img, {"keep.txt": b"keep me\n"})
    before = img.read_bytes()
    r = pyvirt("run", "--disk", f"{img},ro", "--command",
               "cat /sys/block/vda/ro; dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync; echo dd=$?; "
               "mount -o ro /dev/vda /mnt && cat /mnt/keep.txt")
    assert r.code == 0, r.out + r.err
    assert r.out.splitlines()[0] == "1"
    assert "dd=1" in r.out
    assert "keep me" in r.out
    assert img.read_bytes() == before


def test_guest_discard_frees_the_range(default_image, tmp_path: Path) -> None:
    """blkdiscard in the guest reaches the host file as a punched hole (reads as zeros)."""
    img = tmp_path / "discard.img"
    img.write_bytes(b"\xaa" * (4 << 20))
    r = pyvirt("run", "--disk", str(img), "--command",
               "cat /sys/block/vda/queue/discard_max_bytes; blkdiscard -o 65536 -l 131072 /dev/vda; echo rc=$?")
    assert r.code == 0, r.out + r.err
    lines = r.out.splitlines()
    assert int(lines[0]) > 0 and "rc=0" in lines
    data = img.read_bytes()
    assert len(data) == 4 << 20
    assert data[:65536] == b"\xaa" * 65536 and data[196608:] == b"\xaa" * (len(data) - 196608)
    if data[65536:196608] != bytes(131072):
        pytest.skip("the host file system does not punch holes (discard is advisory)")


def test_virtio_console_ports(default_image, tmp_path: Path) -> None:
    """hvc0 and a named port: the guest finds the port by name, writes to the host's
    socket client and reads what the client sends back."""
    import socket
    import threading

    sock = tmp_path / "data.sock"
    got: list[bytes] = []

    def host_side() -> None:
        for _ in range(600):
            if sock.exists():
                break
            time.sleep(0.05)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(sock))
        c.settimeout(120)
        buf = b""
        while b"\n" not in buf:
            chunk = c.recv(100)
            if not chunk:
                break
            buf += chunk
        got.append(buf)
        c.sendall(b"hello-from-host\n")
        time.sleep(2)
        c.close()

    t = threading.Thread(target=host_side, daemon=True)
    t.start()
    cmd = ("ls /dev/hvc0 && for p in /sys/class/virtio-ports/*; do cat $p/name; done; "
           "dev=/dev/$(basename $(grep -l '^data$' /sys/class/virtio-ports/*/name | xargs dirname)); "
           "exec 3<>$dev; echo hello-from-guest >&3; head -n1 <&3")
    r = pyvirt("run", "--vport", f"data={sock}", "--command", cmd, timeout=300)
    t.join(10)
    assert r.code == 0, r.out + r.err
    assert "/dev/hvc0" in r.out and "data" in r.out.splitlines()
    assert got == [b"hello-from-guest\n"]
    assert r.out.splitlines()[-1] == "hello-from-host"
    assert not sock.exists()                        # removed when the VMM exits


def test_qcow2_overlay_disk(default_image, tmp_path: Path) -> None:
    """An ext4 file system in a qcow2 image (made by qemu-img), under a qcow2 overlay made by
    pyvirt: the guest reads the base's file and writes a new one into the overlay; QEMU then
    finds the overlay clean and reads the guest's file out of it, and the base is untouched."""
    from pyvirt.testing import qemu_img as q

    if q.QEMU_IMG is None:
        pytest.skip("needs qemu-img (Debian: qemu-utils)")
    raw = tmp_path / "fs.raw"
    _mkfs(raw, {"hello.txt": b"from the base image\n"})
    base = tmp_path / "base.qcow2"
    q.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, base)       # compressed clusters too
    top = tmp_path / "top.qcow2"
    assert pyvirt("disk", "create", str(top), "--backing", str(base)).code == 0
    frozen = base.read_bytes()
    r = pyvirt("run", "--disk", str(top), "--command",
               "mount /dev/vda /mnt && cat /mnt/hello.txt && echo written-in-guest > /mnt/new.txt "
               "&& sync && umount /mnt")
    assert r.code == 0, r.out + r.err
    assert "from the base image" in r.out
    assert base.read_bytes() == frozen
    chk = q.check(top)
    assert chk["returncode"] == 0, chk
    out = tmp_path / "out.raw"
    q.qemu_img("convert", "-O", "raw", top, out)
    assert _debugfs_cat(out, "new.txt") == b"written-in-guest\n"
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout


def test_qcow2_write_without_flush_is_kept_at_exit(default_image, tmp_path: Path) -> None:
    """O_DIRECT write, no FLUSH from the guest: the qcow2 metadata naming the new cluster
    waits in memory, and the VM's exit writes it back (it did not, once)."""
    from pyvirt.testing import qemu_img as q

    if q.QEMU_IMG is None:
        pytest.skip("needs qemu-img (Debian: qemu-utils)")
    img = tmp_path / "d.qcow2"
    assert pyvirt("disk", "create", str(img), "--size", "16M").code == 0
    r = pyvirt("run", "--disk", str(img), "--command",
               "echo kept-at-exit | dd of=/dev/vda bs=512 seek=100 conv=sync oflag=direct 2>/dev/null")
    assert r.code == 0, r.out + r.err
    assert q.check(img)["returncode"] == 0
    assert q.to_raw(img)[100 * 512:100 * 512 + 13] == b"kept-at-exit\n"
