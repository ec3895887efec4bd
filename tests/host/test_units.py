"""Unit tests of pyvirtd's parts: the store, the API model -> VmSpec mapping, the runner's
control protocol and the process identity check."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirt.errors import ConfigError
from pyvirt.host import cgroups
from pyvirt.host.control import ControlServer, request
from pyvirt.host.models import VMM_OVERHEAD, VmCreate, to_spec
from pyvirt.host.paths import proc_cpu_ticks, proc_start_time, state_dir
from pyvirt.host.store import DuplicateName, Store, VmRecord
from pyvirt.images import cached_default_image
from pyvirt.spec import VmSpec
from pyvirt.vmm.vm import Watch


def rec(name: str, vm_id: str, **kw: object) -> VmRecord:
    return VmRecord(id=vm_id, name=name, spec="{}", limits='{"memory_limit": 1}', desired="stopped",
                    created=time.time(), **kw)


def test_store_round_trip(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    s.add(rec("a", "id1"))
    s.add(rec("b", "id2"))
    assert [r.name for r in s.all()] == ["a", "b"]
    assert s.get("a").id == "id1" and s.get("id2").name == "b" and s.get("zz") is None
    with pytest.raises(DuplicateName):
        s.add(rec("a", "id3"))
    s.update("id1", state="running", pid=123, pid_start=456)
    got = s.get("a")
    assert (got.state, got.pid, got.pid_start, got.alive) == ("running", 123, 456, True)
    with pytest.raises(ValueError):
        s.update("id1", state="dancing")
    with pytest.raises(KeyError):
        s.update("id1", colour="red")
    s.delete("id1")
    assert s.get("a") is None
    s.close()
    again = Store(tmp_path / "db")                 # persisted
    assert [r.name for r in again.all()] == ["b"]
    again.close()


@pytest.fixture(scope="module")
def image():   # noqa: ANN201
    img = cached_default_image()
    if img is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    return img


def test_default_guest_mapping(image) -> None:   # noqa: ANN001
    spec, limits = to_spec(VmCreate(name="a", memory="64M", cpus=2, command="echo hi"))
    assert isinstance(spec, VmSpec)
    assert spec.kernel == image.kernel and spec.initrd == image.initrd
    assert spec.memory == 64 << 20 and spec.cpus == 2
    encoded = [a for a in spec.append.split() if a.startswith("pyvirt.cmd=")]
    assert base64.b64decode(encoded[0].split("=", 1)[1]) == b"echo hi"
    assert limits.cpu_quota is None and limits.memory_limit == (64 << 20) + VMM_OVERHEAD
    # the same JSON gives the same spec (what the daemon stores and the runner reads)
    assert VmSpec.model_validate_json(spec.model_dump_json()) == spec


def test_mapping_matches_the_cli(image, tmp_path: Path) -> None:   # noqa: ANN001
    from pyvirt.guestcmd import command_append
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 65536)
    spec, limits = to_spec(VmCreate(name="a", memory=128 << 20, disks=[f"{disk},ro"],
                                    nets=["stream=/tmp/x.sock,mac=52:54:00:00:00:09"],
                                    command="true", cpu_quota=0.5, memory_limit="1G"))
    assert spec.append == command_append(image.cmdline, "true")
    assert spec.disks[0].path == disk and spec.disks[0].read_only
    assert spec.nets[0].backend == "stream" and spec.nets[0].mac == "52:54:00:00:00:09"
    assert limits.cpu_quota == 0.5 and limits.memory_limit == 1 << 30


@pytest.mark.parametrize("fields, message", [
    ({"memory": "12Q"}, "memory 12Q: expected a size"),
    ({"memory": "17M"}, "multiple of 2 MiB"),
    ({"kernel": "/nope"}, "kernel /nope: no such file"),
    ({"initrd": "/nope", "kernel": sys.executable}, "initrd /nope: no such file"),
    ({"disks": ["/nope"]}, "disk /nope: no such file"),
    ({"nets": ["wifi"]}, "--net wifi"),
    ({"cpu_quota": 1.5}, "more than the VM's 1 cpu"),
    ({"memory_limit": "100M", "memory": "64M"}, "too small"),
    ({"command": "x" * 1000}, "command is too long"),
])
def test_mapping_errors(image, fields: dict, message: str) -> None:   # noqa: ANN001
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        to_spec(VmCreate(name="a", **fields))


def test_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVIRT_STATE_DIR", str(tmp_path / "s"))
    d = state_dir()
    assert d == tmp_path / "s" and (d.stat().st_mode & 0o777) == 0o700
    assert state_dir(tmp_path / "t") == tmp_path / "t"
    with pytest.raises(ConfigError, match="too long"):
        state_dir(tmp_path / ("x" * 120))
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="state directory"):
        state_dir(tmp_path / "f")


def test_process_identity() -> None:
    me = proc_start_time(os.getpid())
    assert isinstance(me, int) and me > 0
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    started = proc_start_time(p.pid)
    p.wait()
    assert started is not None and started >= me
    assert proc_start_time(p.pid) is None           # reaped: gone
    assert proc_cpu_ticks(os.getpid()) is not None


def test_cgroups_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVIRT_CGROUP", "none")
    sup = cgroups.detect()
    assert sup.version is None and not sup.cpu and not sup.memory and "PYVIRT_CGROUP" in sup.reason
    pl = cgroups.place(sup, "x", os.getpid(), 0.5, 1 << 30)
    assert pl.dirs == [] and pl.cpu_quota is None and pl.memory_limit is None and "PYVIRT_CGROUP" in pl.reason


def test_control_protocol(tmp_path: Path) -> None:
    """The server parses each JSON line into its typed request before the handler sees it and
    answers from the run loop's watch hook; a bad line (not JSON, no op, an unknown op, a
    field the request does not have or a bad value) is one clear error reply; a handler may
    answer later (the snapshot reply); both ends check replies against the request's model."""
    import threading

    from pyvirt.host import control

    seen: list[control.Request] = []
    later: list[control.Respond] = []

    def handler(req: control.Request, respond: control.Respond) -> control.Done | None:
        seen.append(req)
        if isinstance(req, control.Kill):
            raise RuntimeError("exploded")
        if isinstance(req, control.Snapshot):
            later.append(respond)
            return None
        if isinstance(req, control.Pause):
            return control.Done()            # the wrong kind of reply for a pause
        return control.StatusReply(state="running", pid=1, instructions=5, resets=0, agent=False,
                                   console_attached=False)

    srv = ControlServer(tmp_path / "c.sock", handler)
    assert (tmp_path / "c.sock").stat().st_mode & 0o777 == 0o600
    w = Watch(srv.fds, srv.on_ready)
    stop = threading.Event()

    def loop() -> None:
        import select
        while not stop.is_set():
            r, _, _ = select.select(w.fds(), [], [], 0.05)
            if r:
                w.on_ready(r)
            while later:                     # answered on a later turn of the loop
                later.pop()(control.SnapshotReply(snapshot=control.SnapshotOutcome(dir="/d", then="quit",
                                                                                     ok=True)))

    t = threading.Thread(target=loop)
    t.start()
    sock = tmp_path / "c.sock"
    try:
        st = control.call(sock, control.Status())
        assert isinstance(st, control.StatusReply) and st.instructions == 5
        snap = control.call(sock, control.Snapshot(dir="/d", then="quit"))
        assert isinstance(snap, control.SnapshotReply) and snap.snapshot.ok is True
        with pytest.raises(control.Refused, match="kill: exploded"):
            control.call(sock, control.Kill())
        with pytest.raises(control.Refused, match="wrong kind"):
            control.call(sock, control.Pause())
        assert request(sock, "status", x=5) == {"ok": False, "error": "status: x: Extra inputs are not permitted"}
        bad = request(sock, "fly")
        assert bad["ok"] is False and bad["error"].startswith("unknown op 'fly' (status, pause")
        bad = request(sock, "mac", iface="eth0; reboot", address="02:00:00:00:00:01")
        assert bad["ok"] is False and bad["error"].startswith("mac: iface: String should match")
        bad = request(sock, "snapshot", then="later")
        assert bad["ok"] is False and bad["error"].startswith("snapshot: dir: Field required")
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        s.sendall(b"not json\n{\"no\": 1}\n")
        replies = b""
        while replies.count(b"\n") < 2:
            replies += s.recv(4096)
        s.close()
        assert replies.count(b'"ok":false') == 2 and b"one JSON object per line" in replies
    finally:
        stop.set()
        t.join()
        srv.close()
    assert [r.op for r in seen] == ["status", "snapshot", "kill", "pause"]
    assert not (tmp_path / "c.sock").exists()


def test_control_client_refuses_a_bad_reply(tmp_path: Path) -> None:
    """The daemon's side checks what a runner answers: a reply that is not the request's
    reply model is one ProtocolError naming the request, not a KeyError later."""
    import threading

    from pyvirt.fsutil import listen_unix
    from pyvirt.host import control
    srv = listen_unix(tmp_path / "r.sock")
    srv.setblocking(True)
    replies = [b'{"ok": true, "state": "sleeping"}\n', b"[1, 2]\n", b'{"ok": false}\n', b"\xff\n"]

    def serve() -> None:
        for reply in replies:
            conn, _ = srv.accept()
            conn.recv(4096)
            conn.sendall(reply)
            conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with pytest.raises(control.ProtocolError, match="malformed reply to pause: state"):
            control.call(tmp_path / "r.sock", control.Pause())
        with pytest.raises(control.ProtocolError, match="malformed reply to status"):
            control.call(tmp_path / "r.sock", control.Status())
        with pytest.raises(control.ProtocolError, match="malformed error reply to kill"):
            control.call(tmp_path / "r.sock", control.Kill())
        with pytest.raises(control.ProtocolError, match="not JSON"):
            control.call(tmp_path / "r.sock", control.Status())
    finally:
        t.join()
        srv.close()


def test_runner_restore_hook_reports_a_bad_snapshot(tmp_path: Path) -> None:
    """config.json's "restore" goes to load_snapshot; a bad snapshot is a one-line ConfigError
    (the runner writes it to exit.json and the daemon shows the VM crashed with it)."""
    from pyvirt.host import runner
    from pyvirt.host.paths import vm_paths
    with pytest.raises(ConfigError, match="snapshot") as e:
        runner.build_vm({"restore": str(tmp_path / "nothing")}, vm_paths(tmp_path, "x"), None)   # type: ignore[arg-type]
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError):
        runner.build_vm({"restore": str(tmp_path), "overrides": {"nets": [{"backend": "warp"}]}},
                        vm_paths(tmp_path, "x"), None)   # type: ignore[arg-type]


def test_console_log_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvirt.host import runner
    monkeypatch.setattr(runner, "LOG_MAX", 1000)
    con = runner.SocketConsole(tmp_path / "console.log", tmp_path / "console.sock")
    try:
        for i in range(30):
            con.write(f"line {i:04d} ".encode() * 8 + b"\n")     # 81 bytes a line
            con.poll()
    finally:
        con.close()
    new, old = (tmp_path / "console.log").read_bytes(), (tmp_path / "console.log.1").read_bytes()
    assert 0 < len(new) <= 1000 + 81 and 1000 < len(old) <= 1000 + 81
    text = (old + new).decode()
    assert text.endswith("line 0029 \n") and text.count("\n") == len(old + new) // 81
    assert not (tmp_path / "console.sock").exists()


def test_cgroup_v2_delegation_and_limits(tmp_path: Path) -> None:
    """v2 on a stand-in tree: controllers delegated below the daemon's cgroup, then cpu.max,
    memory.max and cgroup.procs written for the VM."""
    own = tmp_path / "daemon.scope"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    sup = cgroups._detect_v2(str(tmp_path), "/daemon.scope")
    assert sup.version == "v2" and sup.cpu and sup.memory and sup.reason is None
    assert (own / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (own / "pyvirt" / "cgroup.subtree_control").read_text() == "+cpu +memory"
    pl = cgroups.place(sup, "abc", 4321, 0.25, 300 << 20)
    d = own / "pyvirt" / "abc"
    assert pl.dirs == [d] and pl.cpu_quota == 0.25 and pl.memory_limit == 300 << 20 and pl.reason is None
    assert (d / "cpu.max").read_text() == "25000 100000"
    assert (d / "memory.max").read_text() == str(300 << 20)
    assert (d / "cgroup.procs").read_text() == "4321"
    cgroups.place(sup, "nolimit", 1, None, 1 << 30)
    assert (own / "pyvirt" / "nolimit" / "cpu.max").read_text() == "max 100000"
    assert sorted(d.name for d in cgroups.leftovers(sup)) == ["abc", "nolimit"]


def test_cgroup_v2_without_controllers(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("pids\n")
    sup = cgroups._detect_v2(str(tmp_path), "/")
    assert sup.version is None and not sup.cpu and not sup.memory
    assert "cpu controller is not available" in sup.reason and "memory" in sup.reason
    pl = cgroups.place(sup, "x", 1, 0.5, 1 << 30)
    assert pl.dirs == [] and pl.cpu_quota is None and "not available" in pl.reason


def test_cgroup_v1_limits(tmp_path: Path) -> None:
    bases = {"cpu": tmp_path / "cpu" / "pyvirt", "memory": tmp_path / "memory" / "x" / "pyvirt"}
    for b in bases.values():
        b.mkdir(parents=True)
    sup = cgroups.Support("v1", bases=bases)
    pl = cgroups.place(sup, "vm1", 99, 1.5, 512 << 20)
    cpu, mem = bases["cpu"] / "vm1", bases["memory"] / "vm1"
    assert pl.dirs == [cpu, mem] and pl.reason is None
    assert (cpu / "cpu.cfs_quota_us").read_text() == "150000"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (mem / "memory.limit_in_bytes").read_text() == str(512 << 20)
    assert (cpu / "cgroup.procs").read_text() == (mem / "cgroup.procs").read_text() == "99"
    cgroups.place(sup, "vm2", 99, None, 1 << 30)
    assert (bases["cpu"] / "vm2" / "cpu.cfs_quota_us").read_text() == "-1"
    assert sorted(d.name for d in cgroups.leftovers(sup)) == ["vm1", "vm1", "vm2", "vm2"]


def test_cgroup_write_failure_is_reported(tmp_path: Path) -> None:
    base = tmp_path / "pyvirt"
    base.mkdir()
    (base / "vm1").mkdir()
    (base / "vm1" / "cpu.cfs_quota_us").mkdir()          # not writable as a file
    pl = cgroups.place(cgroups.Support("v1", bases={"cpu": base}), "vm1", 1, 0.5, 1 << 30)
    assert pl.cpu_quota is None and "cannot set the cpu limit" in pl.reason


def test_daemons_with_different_state_dirs_have_separate_cgroup_subtrees(tmp_path: Path) -> None:
    """Each daemon's VMs live under pyvirt-<its digest>: one daemon's leftovers are never another's
    (a shared pyvirt/ made a starting daemon kill the VMs of another)."""
    own = tmp_path / "daemon.scope"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpu memory\n")
    a = cgroups._detect_v2(str(tmp_path), "/daemon.scope", "aaaa")
    b = cgroups._detect_v2(str(tmp_path), "/daemon.scope", "bbbb")
    cgroups.place(a, "vm-a", 1, None, 1 << 30)
    cgroups.place(b, "vm-b", 2, None, 1 << 30)
    assert (own / "pyvirt-aaaa" / "vm-a" / "cgroup.procs").read_text() == "1"
    assert (own / "pyvirt-bbbb" / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert [d.name for d in cgroups.leftovers(a)] == ["vm-a"]
    assert [d.name for d in cgroups.leftovers(b)] == ["vm-b"]


def test_console_output_within_one_slice_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest printing through the SBI (1 MiB per DBCN call) within one CPU slice, with no
    poll in between: the runner's memory and console.log stay bounded (issue 14)."""
    from pyvirt.host import runner
    monkeypatch.setattr(runner, "LOG_MAX", 4 << 20)
    con = runner.SocketConsole(tmp_path / "console.log", tmp_path / "console.sock")
    try:
        for _ in range(64):                                  # 64 MiB, no poll()
            con.write(b"x" * (1 << 20))
            assert len(con._log) <= runner.LOG_PENDING + (1 << 20)
    finally:
        con.close()
    assert (tmp_path / "console.log").stat().st_size <= (4 << 20) + (1 << 20)
    assert (tmp_path / "console.log.1").stat().st_size <= (4 << 20) + (1 << 20)
