"""The runner's jail (issue 14, item 2; host/jail.py): what a jailed runner must not do is
refused, and a jailed daemon VM still boots, runs, snapshots, reboots and stops."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirt.host import control, jail
from pyvirt.testing.daemon import Daemon, wait_for

pytestmark = pytest.mark.slow
LAYERS_ON = os.geteuid() == 0 and jail.landlock_abi() >= 4


def test_a_jailed_process_is_refused_what_a_runner_must_not_do(tmp_path: Path) -> None:
    """The same jail as a runner's (python -m pyvirt.host.jail --selftest applies it), then:
    a host file outside its directory, a host Unix socket and a TCP listener it was not given,
    exec, fork, raising a capability, changing uid -- each refused; its own directory and the
    file it was given still work."""
    if not LAYERS_ON:
        pytest.skip("needs root and Landlock ABI >= 4")
    mine = tmp_path / "vm"
    mine.mkdir()
    given = tmp_path / "image"
    given.write_bytes(b"disk")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "host.sock"))
    unix.listen()
    tcp = socket.create_server(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0pyvirt-jail-test-{os.getpid()}")
    abstract.listen()
    try:
        r = subprocess.run([sys.executable, "-m", "pyvirt.host.jail", "--selftest", "--dir", str(mine),
                            "--read", str(given), "--socket", str(tmp_path / "host.sock"),
                            "--tcp", str(tcp.getsockname()[1]), "--abstract", f"pyvirt-jail-test-{os.getpid()}"],
                           capture_output=True, text=True, timeout=60,
                           cwd="/",          # (the working directory, first on sys.path, is not opened)
                           env=dict(os.environ, PYTHONPATH=str(Path(jail.__file__).resolve().parents[2])))
    finally:
        unix.close()
        tcp.close()
        abstract.close()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert all(layer["on"] for layer in out["jail"].values()), out["jail"]
    assert out["caps"] == {"effective": 0, "permitted": 0, "inheritable": 0, "bounding": 0}
    tries = out["tries"]
    assert tries["read_inside"] == "allowed" and tries["read_given"] == "allowed", tries
    for what in ("read_outside", "create_outside", "connect_unix", "connect_tcp", "connect_abstract",
                 "fork_exec", "execve", "raise_capability", "setuid"):
        assert tries[what].startswith("refused"), (what, tries)
    assert not Path("/tmp/pyvirt-jail-escape").exists()
    assert not any(p in ("ro /", "rw /") for p in out["jail"]["landlock"]["paths"])
    # its own user, mount, IPC and network namespaces (not this process's)
    ns = out["jail"]["namespaces"]
    assert ns["user"].startswith("on") and "off" in ns["pid"], ns
    for kind in ("mnt", "ipc", "net"):
        assert ns[kind].startswith("on") and os.readlink(f"/proc/self/ns/{kind}") not in ns[kind], ns


def test_the_network_namespace_alone_cuts_the_host_off(tmp_path: Path) -> None:
    """Namespaces only (no Landlock, no seccomp): TCP to the host's loopback and its abstract
    Unix sockets are out of reach; a socket opened before the jail still works."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tcp = socket.create_server(("127.0.0.1", 0))
    name = f"pyvirt-ns-test-{os.getpid()}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + name)
    abstract.listen()
    port = tcp.getsockname()[1]
    code = ("import json, socket; from pyvirt.host import jail\n"
            "a, b = socket.socketpair()\n"
            "ns = jail.enter_namespaces()\n"
            f"def tcp(): socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
            f"def ab():\n s = socket.socket(socket.AF_UNIX); s.connect('\\0{name}'); s.close()\n"
            "a.sendall(b'x')\n"
            "print(json.dumps({'ns': ns, 'tcp': jail._try(tcp), 'abstract': jail._try(ab), 'old': b.recv(1).decode()}))\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    finally:
        tcp.close()
        abstract.close()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ns"]["net"].startswith("on"), out
    assert out["tcp"].startswith("refused") and out["abstract"].startswith("refused"), out
    assert out["old"] == "x"


def test_a_jailed_daemon_vm_boots_runs_snapshots_and_stops(daemon: Daemon, tmp_path: Path) -> None:
    """With the jail on (pyvirtd's default): a VM with a disk and `--net user` boots and runs its
    command, `inspect` reports every layer on, a snapshot is taken and the VM goes on, a snapshot
    the control socket asks for outside the state directory is refused (the VM goes on too), and
    `stop` powers it off."""
    if not LAYERS_ON:
        pytest.skip("needs root and Landlock ABI >= 4")
    disk = tmp_path / "data.img"
    disk.write_bytes(bytes(1 << 20))
    c = daemon.client
    c.create("j", memory="64M", disks=[str(disk)], nets=["user"],
             command="dd if=/dev/urandom of=/dev/vda bs=4096 count=16 2>/dev/null && sync && echo wrote; "
                     "i=0; while :; do i=$((i+1)); echo n=$i; sleep 0.2; done")
    vm = c.start("j")
    wait_for(lambda: "n=3\n" in c.logs("j")["text"], 60, "the counter")
    assert "wrote\n" in c.logs("j")["text"]
    info = c.inspect("j")
    assert set(info["jail"]) == set(jail.LAYERS) and all(v["on"] for v in info["jail"].values()), info["jail"]
    assert info["jail"]["landlock"]["tcp"] == "denied"

    c.snapshot("j", "s1")
    assert c.snapshot_info("s1")["name"] == "s1"
    n = len(re.findall(r"n=\d+", c.logs("j")["text"]))
    wait_for(lambda: len(re.findall(r"n=\d+", c.logs("j")["text"])) > n + 2, 30, "the VM going on")

    outside = tmp_path / "outside"
    sock = vm["paths"]["control_socket"]
    assert control.request(sock, "snapshot", dir=str(outside), then="continue")["ok"]
    st = wait_for(lambda: (s := control.request(sock, "status"))["snapshot"]["ok"] is not None and s, 30,
                  "the refused snapshot")
    assert st["snapshot"]["ok"] is False and "ermission denied" in st["snapshot"]["error"], st
    assert not (outside / "manifest.json").exists() and st["state"] == "running"

    done = c.stop("j", timeout=30)
    assert done["state"] == "stopped" and done["reason"] == "poweroff", done


def test_a_jailed_daemon_vm_with_a_shared_folder(daemon: Daemon, tmp_path: Path) -> None:
    """virtiofsd is started before the jail and the runner serves the share jailed: the guest
    reads and writes it; it is snapshotted and restored (jailed too, with its own virtiofsd);
virtiofsd ends with the VM."""
    if not LAYERS_ON:
        pytest.skip("needs root and Landlock ABI >= 4")
    share = tmp_path / "share"
    share.mkdir()
    (share / "in").write_text("from the host\n")
    c = daemon.client
    c.create("sh", memory="64M", shares=[f"{share}:work"],
             command="cat /mnt/work/in; echo from the guest > /mnt/work/out; "
                     "i=0; while :; do i=$((i+1)); echo n=$i; sleep 0.2; done")
    c.start("sh")
    wait_for(lambda: "n=2\n" in c.logs("sh")["text"], 60, "the counter")
    assert "from the host\n" in c.logs("sh")["text"]
    assert (share / "out").read_text() == "from the guest\n"
    info = c.inspect("sh")
    assert all(v["on"] for v in info["jail"].values()), info["jail"]
    c.snapshot("sh", "s1")          # (the guest agent unmounts the share for it, then mounts it again)
    assert c.run("sh", ["cat", "/mnt/work/in"]) == (0, b"from the host\n", b"")
    back = c.restore("s1", name="back")["name"]          # a jailed runner with a fresh virtiofsd
    assert c.run(back, ["cat", "/mnt/work/out"]) == (0, b"from the guest\n", b"")
    assert c.run(back, ["sh", "-c", "echo restored > /mnt/work/back"])[0] == 0
    assert (share / "back").read_text() == "restored\n"
    c.kill(back)
    fsd = subprocess.run(["pgrep", "-f", f"source={share}"], capture_output=True, text=True).stdout.split()
    assert fsd, "no virtiofsd serving the share"
    done = c.stop("sh", timeout=30)
    assert done["state"] == "stopped", done
    wait_for(lambda: not subprocess.run(["pgrep", "-f", f"source={share}"], capture_output=True).stdout, 10,
             "virtiofsd to end")


def test_a_jailed_guest_reboot_resets_the_board_in_the_same_runner(daemon: Daemon) -> None:
    """A guest reboot in a jailed runner resets the board in place (issue 13): the same runner
    (it needs no new socket, no new passt, nothing the jail forbids), the VM still running,
    its network up again on the second boot."""
    if not LAYERS_ON:
        pytest.skip("needs root and Landlock ABI >= 4")
    c = daemon.client
    c.create("rb", memory="64M", nets=["user"],
             command="echo booted; ip -4 addr show eth0 | grep -q inet && echo NET-UP; sleep 1; reboot -f; sleep 30")
    first = c.start("rb")["pid"]
    wait_for(lambda: c.logs("rb")["text"].count("NET-UP") >= 2, 90, "a second boot with its network")
    info = c.inspect("rb")
    assert info["state"] == "running" and info["pid"] == first and info["runner"]["resets"] >= 1, info
    assert all(v["on"] for v in info["jail"].values()), info["jail"]
    c.kill("rb")


def test_the_jail_can_be_turned_off(state_dir: Path) -> None:
    """PYVIRT_JAIL=off (or pyvirtd --no-jail): runners run unconfined, and inspect says so."""
    d = Daemon(state_dir, env={"PYVIRT_JAIL": "off"})
    try:
        c = d.client
        assert c.info()["jail"] is False
        c.create("free", memory="64M", command="i=0; while :; do i=$((i+1)); echo n=$i; sleep 0.2; done")
        c.start("free")
        wait_for(lambda: "n=2\n" in c.logs("free")["text"], 60, "the counter")
        layers = c.inspect("free")["jail"]
        assert not any(v["on"] for v in layers.values()) and "turned off" in layers["seccomp"]["reason"]
        c.kill("free")
    finally:
        d.cleanup()


def test_a_layer_the_host_forbids_is_reported_off_and_the_others_still_apply(tmp_path: Path) -> None:
    """No Landlock and no libseccomp (as on an older or locked-down host): those two layers are
    off with the reason, no_new_privs and the capabilities still apply, nothing fails."""
    if os.geteuid() != 0:
        pytest.skip("needs root (capabilities to drop)")
    code = ("import json; from pathlib import Path; from pyvirt.host import jail\n"
            "jail.landlock_abi = lambda: 0\n"
            "def gone(): raise OSError('libseccomp.so.2: cannot open shared object file')\n"
            "jail._libseccomp = gone\n"
            f"r = jail.apply(jail.Jail(rw=[Path({str(tmp_path)!r})]))\n"
            "print(json.dumps({'report': r, 'caps': jail.capabilities_now()}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rep = out["report"]
    assert rep["no_new_privs"]["on"] and rep["capabilities"]["on"], rep
    assert not rep["landlock"]["on"] and "no Landlock" in rep["landlock"]["reason"]
    assert not rep["seccomp"]["on"] and "libseccomp" in rep["seccomp"]["reason"]
    assert out["caps"]["effective"] == 0 and out["caps"]["bounding"] == 0


def test_pyvirt_run_jail_confines_the_vmm_and_the_vm_still_runs(tmp_path: Path) -> None:
    """`pyvirt run --jail`: while the guest runs, the pyvirt process has no capabilities,
    no_new_privs, a seccomp filter and its own network namespace; the guest's command runs
    to its end and its output arrives."""
    if not LAYERS_ON:
        pytest.skip("needs root and Landlock ABI >= 4")
    root = Path(jail.__file__).resolve().parents[2]
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--jail", "--quiet", "--command",
                          "echo STARTED; sleep 4; echo FINISHED"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(root)))
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == "STARTED", (line, p.stderr.read() if p.stderr else "")
        status = Path(f"/proc/{p.pid}/status").read_text()
        fields = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
        assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2", status
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0, status
        assert os.readlink(f"/proc/{p.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "FINISHED" in out
