"""`pyvirt run` never hangs or leaves things behind silently (issue 18, items 2 and 6): a
panicking guest, --timeout, --snapshot-after on the user's disk, and signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pyvirt.testing import stretch
from pyvirt.testing.guest import pyvirt

MIB = 1 << 20


def test_a_kernel_panic_under_command_ends_the_run_in_one_line(default_image, tmp_path: Path) -> None:
    junk = tmp_path / "disk.img"                     # not an initramfs: no root file system, a panic
    junk.write_bytes(bytes(4 * MIB))
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--initrd", str(junk), "--command", "echo hi"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    guard = threading.Timer(120, p.kill)            # (a guest that hangs silently fails the test)
    guard.start()
    try:
        panicked = None
        assert p.stdout is not None
        for line in iter(p.stdout.readline, b""):
            if b"Kernel panic" in line and panicked is None:
                panicked = time.monotonic()
        code = p.wait(timeout=30)
        ended = time.monotonic()
    finally:
        guard.cancel()
        p.kill()
        p.wait()
    err = p.stderr.read().decode() if p.stderr else ""
    assert panicked is not None and ended - panicked < 5, (panicked, ended)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("pyvirt: error: the guest kernel panicked: Kernel panic - not syncing: VFS"), err


def test_timeout_exits_124_saying_so(default_image) -> None:
    r = pyvirt("run", "--command", "sleep 100", "--timeout", "3", timeout=120)
    assert r.code == 124
    assert r.err.strip() == "pyvirt: --timeout 3: the VM was stopped after 3 s (exit status 124)", r.err


def test_snapshot_after_keeps_the_users_disk_and_says_where(default_image, tmp_path: Path) -> None:
    disk = tmp_path / "mine.raw"
    disk.write_bytes(bytes(MIB))
    snap = tmp_path / "snap"
    write = "printf {} | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null; echo wrote; sleep 1000"
    r = pyvirt("run", "--disk", str(disk), "--command", write.format("FIRST"),
               "--snapshot-after", f"12:{snap}", timeout=180)
    assert r.code == 0 and "wrote" in r.out, (r.out, r.err)
    assert r.err.strip() == f"pyvirt: snapshot saved in {snap}: `pyvirt run --restore {snap}` goes on from it"
    assert disk.read_bytes()[:5] == b"FIRST" and disk.stat().st_mode & 0o200
    # The user's file stays theirs: a later run writes it, the snapshot is not changed by that.
    r = pyvirt("run", "--disk", str(disk), "--command", "printf LATER | dd of=/dev/vda conv=notrunc,fsync",
               timeout=180)
    assert r.code == 0, r.err
    assert disk.read_bytes()[:5] == b"LATER"
    r = pyvirt("run", "--restore", str(snap), "--timeout", "2", timeout=180)
    assert r.code == 124 and "changed" not in r.err, r.err


def _signal_and_clear(p: subprocess.Popen[bytes], sig: int, tmp: Path) -> tuple[int | None, list[str]]:
    """Send `sig` to pyvirt run `p` (if it still runs) and wait for it: its exit status (None if
    it had to be killed) and what it left in its TMPDIR `tmp` (which is removed)."""
    code: int | None = None
    try:
        if p.poll() is None:
            p.send_signal(sig)
        code = p.wait(timeout=30)
    finally:
        p.kill()
        p.wait()
        left = sorted(f.name for f in tmp.iterdir())
        shutil.rmtree(tmp, ignore_errors=True)
    return code, left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_cleans_up_every_temporary_file_and_child(default_image, tmp_path: Path, sig: int) -> None:
    """A restored VM with a disk and a user network: its overlay and passt's directory live in
    TMPDIR, and passt is a child; a signal leaves none of them."""
    disk = tmp_path / "mine.raw"
    disk.write_bytes(bytes(MIB))
    snap = tmp_path / "snap"
    r = pyvirt("run", "--disk", str(disk), "--net", "user", "--command", "sleep 1000",
               "--snapshot-after", f"1:{snap}", timeout=180)
    assert r.code == 0, r.err
    tmp = Path(tempfile.mkdtemp(prefix="pvtmp-"))    # (passt runs as nobody: not under tmp_path)
    tmp.chmod(0o755)
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--restore", str(snap)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=dict(os.environ, TMPDIR=str(tmp)))
    try:
        deadline = time.monotonic() + stretch(60)
        def passt_pid() -> str:
            return "".join(f.read_text().strip() for f in tmp.glob("pyvirt-passt-*/passt.pid"))

        while not (len(list(tmp.glob("pyvirt-restore-*"))) == 1 and passt_pid()):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.stderr else ""
            time.sleep(0.1)
        passt = int(passt_pid())
        time.sleep(0.5)
    finally:
        code, left = _signal_and_clear(p, sig, tmp)
    err = p.stderr.read().decode() if p.stderr else ""
    assert code == 128 + sig
    assert err.strip() == (f"pyvirt: stopped by {signal.Signals(sig).name}: the VM was shut down and its "
                           "temporary files removed"), err
    assert left == []
    stat = Path(f"/proc/{passt}/stat")
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"


OPENSBI = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.elf")


@pytest.mark.skipif(not OPENSBI.exists(), reason="Debian's opensbi package is not installed")
def test_opensbi_fw_dynamic_boots_the_default_kernel(default_image) -> None:
    r = pyvirt("run", "--bios", str(OPENSBI), "--kernel", str(default_image.kernel),
               "--initrd", str(default_image.initrd), "--command", "echo hi-from-$(uname -m)", timeout=180)
    assert r.code == 0 and "OpenSBI" in r.out and "hi-from-riscv64" in r.out, (r.out[-2000:], r.err)
    r = pyvirt("run", "--bios", str(OPENSBI), timeout=60)       # it has nothing to start
    assert r.code == 1 and len(r.err.splitlines()) == 1 and "add --kernel IMAGE" in r.err, r.err


SPIN = """
volatile unsigned long spins;

void main(void) {
    for (;;)
        spins++;
}
"""


def test_firmware_that_never_starts_the_kernel_is_reported(default_image, tmp_path: Path) -> None:
    from pyvirt.testing import asm
    why = asm.toolchain_missing()
    if why:
        pytest.skip(why)
    asm.set_cache_dir(tmp_path)
    spin = asm.bare_elf(c=SPIN)
    r = pyvirt("run", "--bios", str(spin), "--kernel", str(default_image.kernel), "--engine", "jit",
               timeout=300)
    assert r.code == 1, r.err
    assert len(r.err.splitlines()) == 1 and f"the firmware {spin} did not start the kernel" in r.err, r.err


def test_a_silent_boot_shows_progress_on_a_terminal(default_image) -> None:
    from pyvirt.testing.guest import PtyConsole
    con = PtyConsole("--command", "sleep 5; echo finished", timeout=120)
    try:
        con.expect(rb"pyvirt: booting, \d+ s, [\d,]+M instructions")
        con.expect(rb"\r\x1b\[Kfinished")                  # the line is erased for the guest's output
    finally:
        con.kill()
    quiet = PtyConsole("--quiet", "--command", "sleep 5; echo finished", timeout=120)
    try:
        quiet.expect(rb"finished")
        assert b"booting" not in quiet.buf
    finally:
        quiet.kill()


def test_a_signal_during_a_command_removes_its_port_sockets(default_image) -> None:
    """`pyvirt run --command` serves the command's stdin/stdout/stderr on Unix sockets in a
    private directory in TMPDIR: SIGTERM while the command runs leaves nothing there."""
    tmp = Path(tempfile.mkdtemp(prefix="pvtmp-"))
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--command", "echo started; sleep 1000"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, TMPDIR=str(tmp)))
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"started\n"            # the guest runs the command
        assert [f.name.startswith("pyvirt-cmd-") for f in tmp.iterdir()] == [True]
    finally:
        code, left = _signal_and_clear(p, signal.SIGTERM, tmp)
    assert code == 128 + signal.SIGTERM
    assert left == []
