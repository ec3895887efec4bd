"""Snapshots of the default Linux guest: a counter that goes on counting in a new
process, and clones that share one snapshot without seeing each other's disks."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from pathlib import Path

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.backends.disk import open_disk
from pyvirt.spec import DiskSpec, make_spec
from pyvirt.testing.guest import pyvirt
from pyvirt.vmm.restore import Overrides, load_snapshot
from pyvirt.vmm.vm import Vm

pytestmark = pytest.mark.slow

COUNTER = 'i=0; echo hello > /tmp/f; while true; do i=$((i+1)); echo "C=$i F=$(cat /tmp/f)"; sleep 0.2; done'


def counts(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^C=(\d+) F=hello$", text, re.M)]


def test_counter_continues_in_a_new_process(default_image, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    before = pyvirt("run", "--command", COUNTER, "--snapshot-after", f"12:{snap}", timeout=300)
    assert before.code == 0, before.err
    seen = counts(before.out)
    assert len(seen) >= 3, before.out[-500:]
    ram = snap / "ram"
    st = ram.stat()
    assert st.st_size == (256 << 20) + 4096
    assert st.st_blocks * 512 < st.st_size // 4            # sparse: zero pages are holes
    digest = hashlib.sha256(ram.read_bytes()).hexdigest()

    after = pyvirt("run", "--restore", str(snap), "--timeout", "4", timeout=300)
    assert after.code == 124, after.err                      # stopped by --timeout, still counting
    more = counts(after.out)
    assert more, after.out[-500:]
    assert seen[-1] < more[0] <= seen[-1] + 2, (seen[-3:], more[:3])     # not from 1 again
    assert more == list(range(more[0], more[0] + len(more)))
    assert hashlib.sha256(ram.read_bytes()).hexdigest() == digest


SHELL = "exec </dev/ttyS0; stty -echo; echo ready; while read -r l; do eval \"$l\"; done"


def run_until(vm: Vm, con: BufferBackend, pattern: bytes, limit: float = 120) -> None:
    end = time.monotonic() + limit
    while pattern not in con.output:
        assert time.monotonic() < end, f"no {pattern!r} in {bytes(con.output[-500:])!r}"
        assert vm.run(timeout=0.3) is None, bytes(con.output[-500:])


def read4(path: Path, fmt: str = "auto") -> bytes:
    b = open_disk(path, read_only=True, fmt=fmt)
    try:
        buf = bytearray(4)
        b.readinto(0, memoryview(buf))
        return bytes(buf)
    finally:
        b.close()


def test_clones_share_the_snapshot_not_their_disks(default_image, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"ORIG" + bytes((8 << 20) - 4))
    append = " ".join([default_image.cmdline.replace("earlycon=sbi", ""), "quiet", "loglevel=0",
                       "pyvirt.cmd=" + base64.b64encode(SHELL.encode()).decode()])
    spec = make_spec(kernel=str(default_image.kernel), initrd=str(default_image.initrd), append=append,
                     disks=[DiskSpec(path=disk, format="raw")])
    con = BufferBackend()
    vm = Vm(spec, con)
    snap = tmp_path / "snap"
    try:
        run_until(vm, con, b"ready\n")
        vm.request_snapshot(snap, then="continue")
        vm.run(timeout=0.3)
        assert (snap / "manifest.json").exists()
        # The original goes on, writing to the user's disk (the snapshot has a copy).
        con.feed(b"printf LIVE | dd of=/dev/vda conv=fsync 2>/dev/null; echo live-done\n")
        run_until(vm, con, b"live-done\n")
        live = Path(vm.spec.disks[0].path)
    finally:
        vm.close()
    assert live == disk and read4(disk, "raw") == b"LIVE"
    assert disk.stat().st_mode & 0o200                        # the user's file is never frozen
    assert read4(snap / "disk0.img", "raw") == b"ORIG"        # the snapshot's copy
    ram_digest = hashlib.sha256((snap / "ram").read_bytes()).hexdigest()

    con_a, con_b = BufferBackend(), BufferBackend()
    a = load_snapshot(snap, con_a, overrides=Overrides(overlay_dir=tmp_path / "a"))
    b = load_snapshot(snap, con_b, overrides=Overrides(overlay_dir=tmp_path / "b"))
    try:
        con_a.feed(b"printf AAAA | dd of=/dev/vda conv=fsync 2>/dev/null; echo wrote-a\n")
        run_until(a, con_a, b"wrote-a\n")
        con_b.feed(b"echo 3 > /proc/sys/vm/drop_caches; echo \"B=$(dd if=/dev/vda bs=4 count=1 2>/dev/null)\"\n")
        run_until(b, con_b, b"B=")
        run_until(b, con_b, b"\n", 5)
        assert re.search(rb"B=(\w*)\n", con_b.output).group(1) == b"ORIG"
    finally:
        a.close()
        b.close()
    assert read4(tmp_path / "a" / "disk0.qcow2") == b"AAAA"
    assert read4(tmp_path / "b" / "disk0.qcow2") == b"ORIG"
    assert read4(snap / "disk0.qcow2") == b"ORIG"
    assert read4(disk, "raw") == b"LIVE"
    assert hashlib.sha256((snap / "ram").read_bytes()).hexdigest() == ram_digest
