"""pyvirtd's REST API against a real daemon: error answers, the life cycle, the socket."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import httpx
import pytest

from pyvirt.host.client import ApiError, Client, DaemonNotRunning
from pyvirt.testing.daemon import Daemon, wait_for

IDLE = "sleep 1000"


def error(call, *args, **kw) -> ApiError:   # noqa: ANN001
    with pytest.raises(ApiError) as e:
        call(*args, **kw)
    assert isinstance(e.value.detail, str) and e.value.detail and "\n" not in e.value.detail
    return e.value


def raw(d: Daemon) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(d.state / "pyvirtd.sock")), base_url="http://d")


def test_socket_is_private_and_serves_openapi(daemon: Daemon) -> None:
    st = os.stat(daemon.state / "pyvirtd.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.state).st_mode) == 0o700
    with raw(daemon) as h:
        doc = h.get("/openapi.json").json()
    assert {"/vms", "/vms/{name}", "/vms/{name}/start", "/vms/{name}/stop", "/vms/{name}/logs",
            "/info"} <= set(doc["paths"])
    info = daemon.client.info()
    assert info["version"] and info["pid"] == daemon.proc.pid
    assert set(info["cgroups"]) >= {"version", "cpu", "memory", "enforced", "reason"}


def test_unknown_vm_is_404(daemon: Daemon) -> None:
    c = daemon.client
    for call in (c.inspect, c.start, c.kill, c.pause, c.resume, c.delete, c.logs):
        e = error(call, "ghost")
        assert e.status == 404 and "ghost" in e.detail
    assert error(c.stop, "ghost", timeout=1).status == 404


@pytest.mark.parametrize("fields, words", [
    ({"memory": "lots"}, "memory"),
    ({"memory": 3 << 20}, "memory"),
    ({"cpus": 9}, "cpus"),
    ({"cpus": 0}, "cpus"),
    ({"kernel": "/no/such/kernel"}, "kernel"),
    ({"disks": ["/no/such/disk.img"]}, "disk"),
    ({"disks": ["x.img,bogus"]}, "bogus"),
    ({"nets": ["carrier-pigeon"]}, "net"),
    ({"cpu_quota": -1}, "cpu_quota"),
    ({"cpu_quota": 2}, "cpu_quota"),
    ({"memory_limit": "1M"}, "memory_limit"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_spec_is_422_with_the_reason(daemon: Daemon, fields: dict, words: str) -> None:
    e = error(daemon.client.create, "vm1", **fields)
    assert e.status == 422 and words in e.detail, e.detail
    assert daemon.client.list() == []


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 64, "ünïcode", "a/b"])
def test_invalid_name_is_rejected(daemon: Daemon, name: str) -> None:
    with raw(daemon) as h:
        r = h.post("/vms", json={"name": name})
    assert r.status_code == 422 and "name" in r.json()["detail"]


def test_malformed_body_is_422(daemon: Daemon) -> None:
    with raw(daemon) as h:
        for body in (b"{", b"[]", b'"x"'):
            r = h.post("/vms", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and isinstance(r.json()["detail"], str)
        r = h.post("/vms/x/stop", params={"timeout": "soon"})
        assert r.status_code in (404, 422)


def test_life_cycle_and_conflicts(daemon: Daemon) -> None:
    c = daemon.client
    vm = c.create("vm1", memory="64M", command=IDLE)
    assert vm["state"] == "stopped" and vm["spec"]["memory"] == 64 << 20
    assert error(c.create, "vm1", memory="64M").status == 409
    assert error(c.stop, "vm1", timeout=1).status == 409            # stopping a stopped VM
    assert error(c.pause, "vm1").status == 409
    assert error(c.kill, "vm1").status == 409
    vm = c.start("vm1")
    assert vm["state"] == "running" and vm["pid"]
    assert error(c.start, "vm1").status == 409                       # starting a running VM
    assert error(c.resume, "vm1").status == 409                      # not paused
    assert error(c.delete, "vm1").status == 409                      # running: needs force
    assert [v["state"] for v in c.list()] == ["running"]
    assert c.pause("vm1")["state"] == "paused"
    assert error(c.pause, "vm1").status == 409
    assert c.resume("vm1")["state"] == "running"
    vm = c.kill("vm1")
    assert vm["state"] == "stopped" and vm["reason"] == "killed" and vm["pid"] is None
    vm = c.start("vm1")                                              # a stopped VM starts again
    assert vm["state"] == "running"
    c.delete("vm1", force=True)
    assert error(c.inspect, "vm1").status == 404
    assert not (daemon.state / "vms" / vm["id"]).exists()


def test_graceful_stop_through_the_agent(daemon: Daemon) -> None:
    c = daemon.client
    c.create("g", memory="64M", command=IDLE)
    c.start("g")
    wait_for(lambda: c.inspect("g").get("runner", {}).get("agent"), 30, "the guest agent")
    t = time.monotonic()
    vm = c.stop("g", timeout=20)
    assert time.monotonic() - t < 10
    assert vm["state"] == "stopped" and vm["reason"] == "poweroff" and vm["exit_status"] == 0


def test_graceful_stop_after_a_guest_reboot(daemon: Daemon, tmp_path: Path) -> None:
    """After a guest reboot (the board reset in place) the agent is reached again: stop is graceful."""
    c = daemon.client
    # The guest reboots once: the first boot leaves a mark on its disk (a deadline on the
    # guest's clock failed on a loaded machine, whose first boot came after it).
    disk = tmp_path / "mark.img"
    disk.write_bytes(bytes(4096))
    c.create("rb", memory="64M", disks=[str(disk)],
             command="if [ \"$(head -c 1 /dev/vda)\" != R ]; then printf R | dd of=/dev/vda conv=notrunc "
                     "2>/dev/null; sync; reboot -f; fi; echo second-boot; sleep 1000")
    first = c.start("rb")["pid"]

    def rebooted() -> bool:      # in place (no jail), or by a new runner (a jailed one cannot)
        vm = c.inspect("rb")
        return vm.get("runner", {}).get("resets", 0) >= 1 or vm.get("pid") not in (None, first)
    wait_for(rebooted, 30, "a guest reboot")
    wait_for(lambda: "second-boot" in c.logs("rb")["text"] and c.inspect("rb").get("runner", {}).get("agent"),
             60, "the rebooted guest's agent")
    vm = c.stop("rb", timeout=20)
    assert vm["state"] == "stopped" and vm["reason"] == "poweroff" and vm["exit_status"] == 0


def test_stop_forces_a_guest_without_agent(daemon: Daemon) -> None:
    c = daemon.client
    # A guest whose /init is a shell loop: no agent reads the port, so stop must force it off.
    c.create("noagent", memory="64M", append="console=ttyS0 quiet rdinit=/bin/sh")
    c.start("noagent")
    t = time.monotonic()
    vm = c.stop("noagent", timeout=2)
    took = time.monotonic() - t
    assert 2 <= took < 15
    assert vm["state"] == "stopped" and "forced" in vm["reason"], vm


def test_guest_exit_status_and_logs(daemon: Daemon) -> None:
    c = daemon.client
    c.create("once", memory="64M", command="echo hello from $(hostname); exit 3")
    c.start("once")
    vm = wait_for(lambda: (v := c.inspect("once"))["state"] == "stopped" and v, 60, "power-off")
    assert vm["exit_status"] == 3 and vm["reason"] == "poweroff"
    logs = c.logs("once")
    assert "hello from once" in logs["text"]                 # the host name is the VM name
    assert c.logs("once", offset=logs["offset"])["text"] == ""
    tail = c.logs("once", tail=6)
    assert tail["text"] == logs["text"][-6:] and tail["start"] == logs["offset"] - 6


def test_a_runner_that_fails_to_start_is_reported(daemon: Daemon, tmp_path) -> None:   # noqa: ANN001
    c = daemon.client
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 4096)
    c.create("gone", memory="64M", disks=[str(disk)], command=IDLE)
    disk.unlink()                                  # the disk disappears before the start
    e = error(c.start, "gone")
    assert e.status == 422 and "could not start" in e.detail
    assert c.inspect("gone")["state"] == "crashed"


def test_no_daemon_is_a_clear_error(state_dir) -> None:   # noqa: ANN001
    with pytest.raises(DaemonNotRunning, match="pyvirtd is not running"):
        Client(state_dir=state_dir).list()


def test_agent_sets_the_hostname(daemon: Daemon) -> None:
    """The control request `hostname` reaches the guest agent (what clones will use)."""
    from pyvirt.host import control
    c = daemon.client
    c.create("named", memory="64M", command="while :; do hostname; sleep 0.3; done")
    vm = c.start("named")
    wait_for(lambda: "named" in c.logs("named")["text"], 30, "the guest's first hostname (its name)")
    assert control.request(vm["paths"]["control_socket"], "hostname", name="clone-7")["ok"]
    wait_for(lambda: "clone-7" in c.logs("named")["text"], 15, "the new hostname")
    bad = control.request(vm["paths"]["control_socket"], "fly")
    assert bad["ok"] is False and "unknown op" in bad["error"]
    for bad in ({}, {"dir": ""}, {"dir": "/tmp/x", "then": "explode"}):
        reply = control.request(vm["paths"]["control_socket"], "snapshot", **bad)
        assert reply["ok"] is False and "snapshot" in reply["error"]
