"""Live migration between two pyvirtd daemons (each its own state directory), through the CLI,
the REST API and pyvirt.Client: over a Unix socket and over TCP with the one-time token; the
guest's counter goes on on the destination and the source's record says where it went; a
wrong token, a used-up token and a spec naming host files the destination did not grant are
refused with the VM running on at the source and nothing left at the destination."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.host.client import ApiError
from pyvirt.testing.daemon import COUNTER, Daemon, counts, wait_for

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


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_a_running_vm_moves_and_counts_on(two: tuple[Daemon, Daemon], tcp: bool) -> None:
    src, dst = two
    started_counter(src)
    endpoint = dst.client.incoming("v", tcp="127.0.0.1:0" if tcp else None)
    assert endpoint["address"].startswith("tcp:127.0.0.1:" if tcp else "unix:")
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
