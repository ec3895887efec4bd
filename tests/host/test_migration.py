"""Live migration between two pyvirtd daemons (each its own state directory), through the CLI,
the REST API and pyvirt.Client: over a Unix socket, over TCP with the one-time token and over
TCP with mutual TLS (both daemons with --tls-creds; certificates made here with openssl); the
guest's counter goes on on the destination and the source's record says where it went; a
wrong token, a used-up token, a spec naming host files the destination did not grant, a
client certificate of another CA, a destination certificate of another CA or for another
name, and a plaintext source at a TLS endpoint are refused with the VM running on at the
source and nothing left at the destination."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.host.client import ApiError
from pyvirt.testing.daemon import COUNTER, Daemon, counts, wait_for
from pyvirt.testing.migrate import guest_view
from pyvirt.testing.tlscerts import issue, make_ca, make_creds

pytestmark = pytest.mark.slow


@pytest.fixture
def two(daemon: Daemon) -> Iterator[tuple[Daemon, Daemon]]:
    other = Path(tempfile.mkdtemp(prefix="pvd-", dir="/tmp"))
    d = Daemon(other)
    try:
        yield daemon, d
    finally:
        d.cleanup()
        shutil.rmtree(other, ignore_errors=True)


def started_counter(src: Daemon) -> None:
    src.client.create("v", memory="128M", command=COUNTER)
    src.client.start("v")
    wait_for(lambda: len(counts(console(src, "v"))) >= 5, 120, "the counter")


def console(d: Daemon, name: str) -> str:
    return str(d.client.logs(name)["text"])


def with_tls(d: Daemon, creds: Path | None) -> None:
    """Restart `d` with --tls-creds `creds` (None: without; its VMs run on)."""
    d.args = ["--tls-creds", str(creds)] if creds else []
    d.restart()


@pytest.mark.parametrize("transport", ["unix", "tcp", "tls"])
def test_a_running_vm_moves_and_counts_on(two: tuple[Daemon, Daemon], transport: str, tmp_path: Path) -> None:
    src, dst = two
    tcp = transport != "unix"
    if transport == "tls":
        creds = make_creds(tmp_path / "creds")
        with_tls(src, creds)
        with_tls(dst, creds)
    started_counter(src)
    endpoint = dst.client.incoming("v", tcp="127.0.0.1:0" if tcp else None)
    assert endpoint["address"].startswith("tcp:127.0.0.1:" if tcp else "unix:")
    assert endpoint["tls"] is (transport == "tls")
    before = counts(console(src, "v"))
    r = src.cli("migrate", "v", "--to", endpoint["address"], "--token", endpoint["token"])
    assert r.returncode == 0, r.stderr
    assert "v migrated (migrated to" in r.stdout
    rec = src.client.inspect("v")
    assert rec["state"] == "migrated" and endpoint["address"] in rec["reason"]
    moved = dst.client.inspect("v")
    assert moved["state"] == "running"
    wait_for(lambda: len(counts(console(dst, "v"))) >= 3, 60, "the counter on the destination")
    # The two consoles end to end (a line may begin at the source and end at the destination):
    # one count, without a gap or a reset.
    both = counts(console(src, "v") + console(dst, "v"))
    assert both == list(range(both[0], both[0] + len(both))), both
    assert both[-1] > before[-1] and counts(console(dst, "v"))
    with pytest.raises(ApiError, match="already migrated"):
        src.client.start("v")


def test_refusals_leave_the_source_running(two: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = two
    started_counter(src)
    endpoint = dst.client.incoming("v")
    with pytest.raises(ApiError, match="wrong migration token"):
        src.client.migrate("v", endpoint["address"], "not-the-token")
    assert src.client.inspect("v")["state"] == "running"
    n = len(counts(console(src, "v")))
    wait_for(lambda: len(counts(console(src, "v"))) > n, 30, "the source counting on")
    with pytest.raises(ApiError, match="cannot reach the destination"):     # the token is used up
        src.client.migrate("v", endpoint["address"], endpoint["token"])
    assert [v["name"] for v in dst.client.list()] == []
    assert not list((dst.state / "vms").iterdir())
    # A disk the destination did not allow: refused before any page moves.
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    src.client.create("w", memory="64M", disks=[str(disk)], command="sleep 1000")
    src.client.start("w")
    endpoint = dst.client.incoming("w")
    with pytest.raises(ApiError, match="is not shared with this host"):
        src.client.migrate("w", endpoint["address"], endpoint["token"])
    assert src.client.inspect("w")["state"] == "running"
    assert dst.client.list() == [] and not list((dst.state / "vms").iterdir())


def outcome(d: Daemon, name: str) -> dict[str, str] | None:
    """The incoming endpoint's state once it is no longer waiting."""
    info: dict[str, str] = d.client._call("GET", f"/migrations/incoming/{name}")
    return info if info["state"] != "waiting" else None


def test_tls_refusals_leave_the_source_running(two: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    """The destination has --tls-creds of CA A.  A source whose client certificate CA B signed,
    one that trusts only CA B, one that expects another name (--tls-hostname), one facing an
    expired server certificate and one without TLS are each refused (one line, exit status 1): the VM runs on at the source, the
    destination keeps nothing; then the right credentials move it."""
    src, dst = two
    ca_a, ca_b = make_ca(tmp_path / "ca-a"), make_ca(tmp_path / "ca-b")
    good = make_creds(tmp_path / "good", ca_a)
    with_tls(dst, good)
    foreign_client = make_creds(tmp_path / "foreign-client", ca_b)      # trusts A, shows B's certificate
    shutil.copy(ca_a / "ca-cert.pem", foreign_client / "ca-cert.pem")
    trusts_b = make_creds(tmp_path / "trusts-b", ca_a)                  # shows A's certificate, trusts B
    shutil.copy(ca_b / "ca-cert.pem", trusts_b / "ca-cert.pem")
    expired = make_creds(tmp_path / "expired", ca_a)                   # the server's certificate ended yesterday
    issue(ca_a, expired, "server", server=True, days=-1)
    started_counter(src)
    cases = [(foreign_client, good, [], "alert unknown ca: the destination refused this daemon's client certificate"),
             (trusts_b, good, [], "TLS handshake failed: certificate verify failed: self-signed certificate in "
                                  "certificate chain"),
             (good, good, ["--tls-hostname", "other.example"], "Hostname mismatch"),
             (good, expired, [], "certificate verify failed: certificate has expired"),
             (None, good, [], "the destination refused: this endpoint takes TLS only")]
    for creds, dst_creds, extra, why in cases:
        with_tls(src, creds)
        if dst.args[1:] != [str(dst_creds)]:
            with_tls(dst, dst_creds)
        endpoint = dst.client.incoming("v", tcp="127.0.0.1:0")
        assert endpoint["tls"] is True
        r = src.cli("migrate", "v", "--to", endpoint["address"], "--token", endpoint["token"], *extra)
        assert r.returncode == 1 and why in r.stderr, (creds, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        info = wait_for(lambda: outcome(dst, "v"), 10, "the endpoint's outcome")
        assert info["state"] == "failed", info
        assert info["error"].startswith("TLS handshake failed: " if creds else "the source does not speak TLS"), info
        assert src.client.inspect("v")["state"] == "running"
        n = len(counts(console(src, "v")))
        wait_for(lambda n=n: len(counts(console(src, "v"))) > n, 30, "the source counting on")
        assert dst.client.list() == [] and not list((dst.state / "vms").iterdir())
    with_tls(src, good)
    endpoint = dst.client.incoming("v", tcp="127.0.0.1:0")
    src.client.migrate("v", endpoint["address"], endpoint["token"], tls_hostname="localhost")
    assert src.client.inspect("v")["state"] == "migrated"
    wait_for(lambda: len(counts(console(dst, "v"))) >= 2, 60, "the counter on the destination")


def test_a_stopped_vm_moves_over_tls(two: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    """Cold migration over TCP with TLS: the source daemon itself sends through its relay; the
    VM arrives stopped.  --tls-hostname without TLS is refused."""
    src, dst = two
    with pytest.raises(ApiError, match="--tls-hostname: only for a TCP address"):
        src.client.migrate("nothing", "unix:/nowhere", "t", tls_hostname="localhost")
    creds = make_creds(tmp_path / "creds")
    with_tls(src, creds)
    with_tls(dst, creds)
    src.client.create("c", memory="64M", command="echo cold-tls-ok")
    endpoint = dst.client.incoming("c", tcp="127.0.0.1:0")
    r = src.cli("migrate", "c", "--to", endpoint["address"], "--token", endpoint["token"])
    assert r.returncode == 0, r.stderr
    assert src.client.inspect("c")["state"] == "migrated"
    assert dst.client.inspect("c")["state"] == "stopped"


def test_pyvirtd_refuses_incomplete_tls_creds(tmp_path: Path) -> None:
    import subprocess
    import sys
    creds = make_creds(tmp_path / "creds")
    (creds / "client-key.pem").unlink()
    r = subprocess.run([sys.executable, "-m", "pyvirt.host.daemon", "--state-dir", str(tmp_path / "state"),
                        "--tls-creds", str(creds)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("pyvirtd: error: --tls-creds") and "client-key.pem" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_killed_destination_runner_leaves_nothing(two: tuple[Daemon, Daemon]) -> None:
    """kill -9 of the destination's runner while pages arrive: the source runs on, the destination
    has no VM and no directory."""
    import os
    import signal
    src, dst = two
    started_counter(src)
    endpoint = dst.client.incoming("v")
    import threading
    outcome: list[object] = []

    def go() -> None:
        try:
            outcome.append(src.client.migrate("v", endpoint["address"], endpoint["token"], downtime=0.0001,
                                              timeout=60))
        except ApiError as e:
            outcome.append(e)
    t = threading.Thread(target=go)
    t.start()
    pid = wait_for(lambda: next((v["pid"] for v in dst.client.list() if v["pid"]), None), 60, "the runner")
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    assert isinstance(outcome[0], ApiError), outcome
    assert src.client.inspect("v")["state"] == "running"
    wait_for(lambda: dst.client.list() == [], 10, "the destination to forget the VM")
    assert not list((dst.state / "vms").iterdir())


def test_cold_migration_of_a_stopped_vm(two: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    """A stopped VM moves its definition (its disk shared: allowed on the destination) and starts there."""
    src, dst = two
    disk = tmp_path / "shared.raw"
    disk.write_bytes(b"MARK" + bytes((1 << 20) - 4))
    src.client.create("c", memory="64M", disks=[str(disk)], command="dd if=/dev/vda bs=4 count=1 2>/dev/null; "
                                                                     "echo; echo cold-ok; sleep 1000")
    endpoint = dst.client.incoming("c", allow=[str(disk)])
    r = src.cli("migrate", "c", "--to", endpoint["address"], "--token", endpoint["token"])
    assert r.returncode == 0, r.stderr
    assert src.client.inspect("c")["state"] == "migrated"
    assert dst.client.inspect("c")["state"] == "stopped"
    dst.client.start("c")
    wait_for(lambda: "cold-ok" in console(dst, "c"), 120, "the moved VM to boot")
    assert "MARK" in console(dst, "c")


# -- non-shared disks: --copy-storage-all ------------------------------------------------------------
# The guest writes a record to sector i of vda (raw) and 4096+i of vdb (qcow2 over a backing
# file), each flushed (conv=fsync), then prints W=i; every 25 records it drops its page cache
# and prints the md5 of vdb's first 2 MiB (the backing file's data and the overlay's, never
# written by the loop): the same sum before and after the move means the disk arrived whole.
WRITER = ('S=$(dd if=/dev/vdb bs=65536 count=32 2>/dev/null | md5sum); echo "SUM ${S%% *}"; i=0; '
          'while true; do i=$((i+1)); '
          'echo "R=$i" | dd of=/dev/vda bs=512 seek=$i conv=notrunc,fsync 2>/dev/null; '
          'echo "R=$i" | dd of=/dev/vdb bs=512 seek=$((4096+i)) conv=notrunc,fsync 2>/dev/null; '
          'echo W=$i; if [ $((i % 25)) = 0 ]; then echo 3 > /proc/sys/vm/drop_caches; '
          'S=$(dd if=/dev/vdb bs=65536 count=32 2>/dev/null | md5sum); echo "SUM ${S%% *}"; fi; '
          'sleep 0.05; done')


def writer_disks(tmp_path: Path) -> tuple[Path, Path]:
    """vda: 4 MiB raw; vdb: an 8 MiB qcow2 over a raw backing file with 2 MiB of data, part of it
    overwritten in the qcow2."""
    import os

    from pyvirt.backends.disk import open_disk
    from pyvirt.backends.qcow2_tools import create_qcow2
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(4 << 20))
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(2 << 20) + bytes(6 << 20))
    top = tmp_path / "top.qcow2"
    create_qcow2(top, None, backing=base, backing_format="raw")
    q = open_disk(top, fmt="qcow2")
    q.write(1 << 20, os.urandom(256 << 10))
    q.close()
    return raw, top


def test_copied_disks_arrive_with_every_flushed_write(two: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    """Non-shared raw and qcow2 disks (the qcow2 over a backing file the destination never sees,
    arriving flattened), written all through the migration: the guest's sums of vdb agree before
    and after, every record it flushed is on the destination's images, qemu-img check is clean."""
    import re
    import subprocess
    src, dst = two
    raw, top = writer_disks(tmp_path)
    region = guest_view(top)[:2 << 20]
    src.client.create("w", memory="128M", disks=[str(raw), str(top)], command=WRITER)
    src.client.start("w")
    wait_for(lambda: "W=20" in console(src, "w"), 180, "the writer")
    endpoint = dst.client.incoming("w")
    r = src.cli("migrate", "w", "--to", endpoint["address"], "--token", endpoint["token"], "--copy-storage-all")
    assert r.returncode == 0, r.stderr
    assert src.client.inspect("w")["state"] == "migrated"
    before = [int(n) for n in re.findall(r"W=(\d+)", console(src, "w"))]
    wait_for(lambda: len(re.findall(r"SUM ", console(dst, "w"))) >= 2, 180, "two sums on the destination")
    dst.client.stop("w")
    wait_for(lambda: dst.client.inspect("w")["state"] == "stopped", 60, "the destination VM to stop")
    text = console(src, "w") + console(dst, "w")
    sums = re.findall(r"SUM ([0-9a-f]{32})", text)
    assert len(set(sums)) == 1 and len(sums) >= 3, sums
    written = [int(n) for n in re.findall(r"W=(\d+)", text)]
    assert written == list(range(1, written[-1] + 1)) and written[-1] > before[-1] + 10, (before[-1], written[-1])
    [vm_dir] = [p for p in (dst.state / "vms").iterdir() if p.is_dir()]
    assert (vm_dir / "disk0.raw").exists() and (vm_dir / "disk1.qcow2").exists()
    a, b = guest_view(vm_dir / "disk0.raw", "raw"), guest_view(vm_dir / "disk1.qcow2", "qcow2")
    for i in written:          # every record the guest flushed, before, during and after the move
        assert a[i * 512:i * 512 + 16].split(b"\n")[0] == f"R={i}".encode(), i
        assert b[(4096 + i) * 512:(4096 + i) * 512 + 16].split(b"\n")[0] == f"R={i}".encode(), i
    assert b[:2 << 20] == region                    # the backing file's data, flattened in
    check = subprocess.run(["qemu-img", "check", str(vm_dir / "disk1.qcow2")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    info = subprocess.run(["qemu-img", "info", str(vm_dir / "disk1.qcow2")], capture_output=True, text=True)
    assert "backing file" not in info.stdout, info.stdout


@pytest.mark.parametrize("when", ["first-blocks", "mid-copy"])
def test_killed_destination_during_a_disk_copy_leaves_nothing(two: tuple[Daemon, Daemon], tmp_path: Path,
                                                              when: str) -> None:
    """kill -9 of the destination's runner as the copy starts and half-way through a 64 MiB
    disk: the source runs on with its disk unchanged, the destination keeps no VM, directory
    or image."""
    import hashlib
    import os
    import signal
    import threading
    src, dst = two
    disk = tmp_path / "big.raw"
    disk.write_bytes(os.urandom(64 << 20))
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    src.client.create("v", memory="128M", disks=[str(disk)], command=COUNTER)
    src.client.start("v")
    wait_for(lambda: len(counts(console(src, "v"))) >= 3, 120, "the counter")
    endpoint = dst.client.incoming("v")
    outcome: list[object] = []

    def go() -> None:
        try:
            outcome.append(src.client.migrate("v", endpoint["address"], endpoint["token"], timeout=120,
                                              copy_storage=True))
        except ApiError as e:
            outcome.append(e)
    t = threading.Thread(target=go)
    t.start()
    pid = wait_for(lambda: next((v["pid"] for v in dst.client.list() if v["pid"]), None), 60, "the runner")

    def copied() -> int:
        return sum(p.stat().st_blocks * 512 for p in (dst.state / "vms").glob("*/disk0.raw"))
    wait_for(lambda: copied() > (1 << 20 if when == "first-blocks" else 24 << 20), 60, "blocks to arrive",
             interval=0.02)
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    assert isinstance(outcome[0], ApiError), outcome
    assert src.client.inspect("v")["state"] == "running"
    n = len(counts(console(src, "v")))
    wait_for(lambda: len(counts(console(src, "v"))) > n, 30, "the source counting on")
    wait_for(lambda: dst.client.list() == [], 10, "the destination to forget the VM")
    assert not list((dst.state / "vms").iterdir())
    src.client.stop("v")
    wait_for(lambda: src.client.inspect("v")["state"] == "stopped", 60, "the source VM to stop")
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == digest


def test_a_stopped_vm_moves_with_its_disks_copied(two: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    """Cold migration with --copy-storage-all: the daemons copy the disk (nothing --allow'ed on
    the destination), the VM arrives stopped with its own image, which it boots from there; the
    source's file is left as it was."""
    import hashlib
    import os
    src, dst = two
    disk = tmp_path / "cold.raw"
    disk.write_bytes(b"COLDMARK" + os.urandom((3 << 20) - 8) + bytes(1 << 20))
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    src.client.create("s", memory="64M", disks=[str(disk)],
                      command="dd if=/dev/vda bs=8 count=1 2>/dev/null; echo; echo cold-copy-ok; sleep 1000")
    endpoint = dst.client.incoming("s")
    r = src.cli("migrate", "s", "--to", endpoint["address"], "--token", endpoint["token"], "--copy-storage-all")
    assert r.returncode == 0, r.stderr
    assert src.client.inspect("s")["state"] == "migrated"
    moved = dst.client.inspect("s")
    assert moved["state"] == "stopped"
    [image] = [Path(d["path"]) for d in moved["spec"]["disks"]]
    assert image.parent.parent == dst.state / "vms" and image.name == "disk0.raw"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
    dst.client.start("s")
    wait_for(lambda: "cold-copy-ok" in console(dst, "s"), 120, "the moved VM to boot")
    assert "COLDMARK" in console(dst, "s")
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == digest
