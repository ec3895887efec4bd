"""Shared host folders end to end: `pyvirt run --share DIR:TAG[,ro]` boots the default guest
with virtiofsd serving DIR, and the guest's command talks to the test through its stdin
(one line = "the host has done its part") while both sides change the share."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirt.testing import stretch
from pyvirt.testing.asm import toolchain_missing, user_elf
from pyvirt.testing.guest import pyvirt
from pyvirt.vmm.snapshot import SHARE_REFUSAL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd needs root"),
    pytest.mark.skipif(not os.access("/usr/lib/qemu/virtiofsd", os.X_OK), reason="no virtiofsd"),
]

# A program whose result is an immediate in its instructions: stale translated code from the
# old file's pages would give the old exit status.
PROGRAM = """
    .globl _start
_start:
    li a0, {code}
    li a7, 93
    ecall
"""


# Code read with O_DIRECT lands where virtiofsd writes it: straight into this process's page,
# the same physical page both rounds.  Each round reads /mnt/work/code into an executable
# buffer, runs it (it returns a digit) and prints the digit; between rounds it waits for a
# byte on stdin (the host rewrites the file).  Stale translated code would print the old digit.
LOADER = """
    .globl _start
_start:
    li a0, 0
    li a1, 4096
    li a2, 7                # PROT_READ | PROT_WRITE | PROT_EXEC
    li a3, 0x22             # MAP_PRIVATE | MAP_ANONYMOUS
    li a4, -1
    li a5, 0
    li a7, 222              # mmap
    ecall
    mv s0, a0
    li s1, 2
round:
    li a0, -100             # AT_FDCWD
    la a1, path
    li a2, 0x4000           # O_RDONLY | O_DIRECT
    li a7, 56               # openat
    ecall
    bltz a0, fail
    mv s2, a0
    mv a1, s0
    li a2, 4096
    li a7, 63               # read
    ecall
    mv s3, a0
    mv a0, s2
    li a7, 57               # close
    ecall
    li t0, 4096
    bne s3, t0, fail
    fence.i
    jalr s0
    addi a0, a0, 48
    la t0, out
    sb a0, 0(t0)
    li a0, 1
    la a1, out
    li a2, 2
    li a7, 64               # write
    ecall
    addi s1, s1, -1
    beqz s1, done
    li a0, 0
    la a1, scratch
    li a2, 1
    li a7, 63               # read: the host has rewritten the file
    ecall
    j round
done:
    li a0, 0
    li a7, 93
    ecall
fail:
    li a0, 7
    li a7, 93
    ecall
    .data
path: .asciz "/mnt/work/code"
out: .ascii "?\\n"
scratch: .byte 0
"""


def returning(n: int) -> bytes:
    """A page of machine code: `li a0, n; ret`."""
    return struct.pack("<II", (n << 20) | (10 << 7) | 0x13, 0x00008067).ljust(4096, b"\0")


class Guest:
    """`pyvirt run --command SCRIPT` with the script's stdin and stdout on pipes."""

    def __init__(self, script: str, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--timeout", str(int(stretch(240))), *args,
                                   "--command", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.out: list[str] = []

    def until(self, marker: str) -> list[str]:
        """The guest's lines up to `marker` (a line of its own)."""
        assert self.p.stdout is not None
        got: list[str] = []
        while True:
            line = self.p.stdout.readline().decode(errors="replace")
            assert line, f"the guest ended before {marker!r}: {self.out + got} {self.finish()}"
            if line.rstrip("\n") == marker:
                self.out += got
                return got
            got.append(line.rstrip("\n"))

    def go(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(b"go\n")
        self.p.stdin.flush()

    def finish(self) -> tuple[int, str]:
        try:
            _, err = self.p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.p.kill()
            _, err = self.p.communicate()
        return self.p.returncode, err.decode(errors="replace")


def test_changes_on_either_side_are_seen_on_the_other(default_image, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "from_host").write_text("hello from the host\n")
    (share / "old_name").write_text("renamed by the host\n")
    (share / "doomed").write_text("x")
    script = """cd /mnt/work || exit 9
cat from_host
echo guest data > g1; mv g1 g2; chmod 751 g2; mkdir gdir; echo made > gdir/inner
echo STEP1; read x
sleep 1.5
ls; stat -c '%a %n' new_name; cat new_name; test -e doomed || echo doomed-gone
rm g2; rmdir gdir 2>/dev/null || rm -r gdir
echo STEP2; read x
"""
    g = Guest(script, "--share", f"{share}:work")
    lines = g.until("STEP1")
    assert "hello from the host" in lines
    assert (share / "g2").read_text() == "guest data\n" and not (share / "g1").exists()
    assert (share / "g2").stat().st_mode & 0o777 == 0o751
    assert (share / "gdir" / "inner").read_text() == "made\n"
    (share / "old_name").rename(share / "new_name")
    (share / "new_name").chmod(0o640)
    (share / "doomed").unlink()
    g.go()
    lines = g.until("STEP2")
    assert "640 new_name" in lines and "renamed by the host" in lines and "doomed-gone" in lines
    assert "old_name" not in lines
    assert not (share / "g2").exists() and not (share / "gdir").exists()
    g.go()
    code, err = g.finish()
    assert code == 0, err


@pytest.mark.skipif(toolchain_missing() is not None, reason="no riscv64 cross toolchain")
def test_a_binary_rewritten_on_the_host_runs_the_new_code(default_image, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    old, new = (user_elf(PROGRAM.format(code=c)).read_bytes() for c in (11, 22))
    assert len(old) == len(new) and old != new
    prog = share / "prog"
    prog.write_bytes(old)
    prog.chmod(0o755)
    script = """for i in 1 2 3; do /mnt/work/prog; echo "rc=$?"; done
echo STEP1; read x
sleep 1.5; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
for i in 1 2 3; do /mnt/work/prog; echo "rc=$?"; done
echo STEP2
"""
    g = Guest(script, "--share", f"{share}:work")
    assert g.until("STEP1") == ["rc=11"] * 3
    with open(prog, "r+b") as f:           # rewritten in place: the same inode, new code
        f.write(new)
    g.go()
    assert g.until("STEP2") == ["rc=22"] * 3
    code, err = g.finish()
    assert code == 0, err


@pytest.mark.skipif(toolchain_missing() is not None, reason="no riscv64 cross toolchain")
def test_code_virtiofsd_writes_into_a_page_already_run_runs_anew(default_image, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "loader").write_bytes(user_elf(LOADER).read_bytes())
    (share / "loader").chmod(0o755)
    (share / "code").write_bytes(returning(1))
    g = Guest("/mnt/work/loader; echo \"rc=$?\"; echo END", "--share", f"{share}:work")
    assert g.until("1") == []
    with open(share / "code", "r+b") as f:
        f.write(returning(2))
    g.go()
    assert g.until("END") == ["2", "rc=0"]
    code, err = g.finish()
    assert code == 0, err


def test_the_guest_cannot_reach_outside_the_share(default_image, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET\n")
    (share / "abs_link").symlink_to(secret)
    (share / "rel_link").symlink_to("../secret")
    script = """cd /mnt/work
cat abs_link rel_link ../secret /mnt/work/../secret 2>&1
ln -s /etc/shadow shadow; cat shadow 2>&1
ln -s ../../../../../../etc/passwd up; cat up 2>&1
ls -a /mnt/work/.. 2>&1
echo DONE
"""
    r = pyvirt("run", "--timeout", str(int(stretch(240))), "--share", f"{share}:work", "--command", script)
    assert r.code == 0, r.err
    assert "DONE" in r.out
    assert "TOPSECRET" not in r.out
    host = set(Path("/etc/passwd").read_text().splitlines())
    if Path("/etc/shadow").exists():
        host |= set(Path("/etc/shadow").read_text().splitlines())
    assert not host & set(r.out.splitlines())        # neither the host's shadow nor its passwd
    assert os.readlink(share / "shadow") == "/etc/shadow"   # made, as a link, inside the share


def test_a_read_only_share_refuses_writes_on_the_host_side(default_image, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "keep").write_text("original\n")
    script = """cd /mnt/ro
cat keep
echo new > keep 2>/dev/null && echo WROTE1
mount -o remount,rw /mnt/ro 2>/dev/null
echo new > keep 2>/dev/null && echo WROTE2
touch made 2>/dev/null && echo WROTE3
rm keep 2>/dev/null && echo WROTE4
chmod 777 keep 2>/dev/null && echo WROTE5
echo DONE
"""
    r = pyvirt("run", "--timeout", str(int(stretch(240))), "--share", f"{share}:ro,ro", "--command", script)
    assert r.code == 0, r.err
    assert "original" in r.out and "DONE" in r.out
    assert "WROTE" not in r.out                      # even remounted read-write in the guest
    assert (share / "keep").read_text() == "original\n"
    assert sorted(p.name for p in share.iterdir()) == ["keep"]
    assert (share / "keep").stat().st_mode & 0o777 != 0o777


def test_a_vm_with_a_share_is_not_snapshotted(default_image, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    snap = tmp_path / "snap"
    start = time.monotonic()
    r = pyvirt("run", "--share", f"{share}:work", "--snapshot-after", f"0:{snap}", "--command", "sleep 60")
    assert r.code != 0
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert lines == [f"pyvirt: error: {SHARE_REFUSAL}"]
    assert not snap.exists() and time.monotonic() - start < 60
