"""`pyvirt run --oci`: the container contract booted on the default kernel (issue 17).

The busybox image (pyvirt.testing.oci: Debian's busybox-static riscv64, three layers, Env
GREETING=hello, WorkingDir /work, User app) and a Debian-trixie image made from the cached Debian
image's root file system with an ENTRYPOINT, both converted once per session into a private
PYVIRT_OCI_CACHE."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.testing import oci as t
from pyvirt.testing import stretch
from pyvirt.testing.guest import PtyConsole, pyvirt


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, default_image) -> Iterator[dict[str, Path]]:
    d = tmp_path_factory.mktemp("oci")
    old = os.environ.get("PYVIRT_OCI_CACHE")
    os.environ["PYVIRT_OCI_CACHE"] = str(d / "cache")
    try:
        layers = t.busybox_layers(t.busybox_binary())
        config = t.image_config(layers, **t.BUSYBOX_CONFIG)
        t.write_layout(d / "busybox", config, layers)
        t.write_docker_archive(d / "busybox.tar", config, layers)
        yield {"busybox": d / "busybox", "busybox.tar": d / "busybox.tar", "dir": d}
    finally:
        if old is None:
            os.environ.pop("PYVIRT_OCI_CACHE", None)
        else:
            os.environ["PYVIRT_OCI_CACHE"] = old


@pytest.fixture(scope="module")
def debian(images: dict[str, Path]) -> Path:
    from pyvirt.images.debian_image import cached_debian_image
    img = cached_debian_image()
    if img is None:
        pytest.skip("the Debian image is not built (`pyvirt image build debian`)")
    layer = t.debian_layer(img.disk, images["dir"])
    config = t.image_config([layer], Entrypoint=t.DEBIAN_ENTRYPOINT, Cmd=["bash"],
                            Env=["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"])
    t.write_docker_archive(images["dir"] / "debian.tar", config, [layer], tag="debian:trixie")
    return images["dir"] / "debian.tar"


def test_echo_hi_and_exit_status(images) -> None:
    r = pyvirt("run", "--oci", str(images["busybox"]), "echo", "hi", timeout=300)
    assert (r.code, r.out) == (0, "hi\n"), r.err
    r = pyvirt("run", "--oci", str(images["busybox.tar"]), "sh", "-c", "exit 7", timeout=120)
    assert r.code == 7, r.err


def test_volumes_mount_host_folders_in_the_container(images, tmp_path: Path) -> None:
    """-v HOSTDIR:GUESTDIR[:ro]: a shared folder (virtio-fs) on GUESTDIR inside the image; the
    container reads and writes it, a :ro volume refuses writes (enforced by the host)."""
    if os.geteuid() != 0:
        pytest.skip("volumes are virtio-fs shares: virtiofsd needs root")
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "in").write_text("from the host\n")
    (ro / "keep").write_text("kept\n")
    r = pyvirt("run", "--oci", str(images["busybox"]), "-u", "0", "-v", f"{rw}:/data/rw", "-v", f"{ro}:/srv/ro:ro",
               "sh", "-c", "cat /data/rw/in; echo out > /data/rw/out; cat /srv/ro/keep; "
                           "echo x > /srv/ro/new 2>/dev/null || echo refused", timeout=300)
    assert (r.code, r.out) == (0, "from the host\nkept\nrefused\n"), r.err
    assert (rw / "out").read_text() == "out\n"
    assert sorted(p.name for p in ro.iterdir()) == ["keep"]
    for bad in (f"{rw}:data", f"{rw}:/a/../b", f"{rw}:/", f"{tmp_path / 'none'}:/x", f"{rw}:/x:rx"):
        r = pyvirt("run", "--oci", str(images["busybox"]), "-v", bad, "true", timeout=60)
        assert r.code != 0 and r.err.startswith("pyvirt: error: -v ") and r.err.count("\n") == 1, (bad, r.err)


def test_the_image_env_workdir_and_user_and_their_overrides(images) -> None:
    show = ["sh", "-c", 'echo "$GREETING|$(pwd)|$(id -u):$(id -g)|$(id -G)|$HOME|$(hostname)"']
    r = pyvirt("run", "--oci", str(images["busybox"]), *show, timeout=120)
    assert r.out == "hello|/work|1000:1000|1000 50|/home/app|container\n", r.err
    r = pyvirt("run", "--oci", str(images["busybox"]), "-e", "GREETING=bye", "-w", "/tmp/new", "-u", "root",
               *show, timeout=120)
    assert r.out == "bye|/tmp/new|0:0|0|/root|container\n", r.err
    r = pyvirt("run", "--oci", str(images["busybox"]), "-u", "1000:staff", *show, timeout=120)
    assert r.out.split("|")[2] == "1000:50", r.err
    r = pyvirt("run", "--oci", str(images["busybox"]), "-u", "nobody", "true", timeout=60)
    assert r.code == 1 and r.err == "pyvirt: error: -u nobody: no user 'nobody' in the image's /etc/passwd\n"


def test_stdin_stdout_stderr_and_the_layers_inside(images) -> None:
    r = pyvirt("run", "--oci", str(images["busybox"]), "-u", "0", "sh", "-c",
               'cat; echo err >&2; stat -c "%a %u %g %h" /data/suid /data/file; cat /gone 2>/dev/null || echo gone; '
               'ls /opaque', stdin=b"from stdin\n", timeout=120)
    assert r.out == "from stdin\n4755 0 0 1\n640 1000 50 3\ngone\nnew\n" and r.err == "err\n", r.err


def test_a_missing_command_and_an_unknown_image_are_one_line(images) -> None:
    r = pyvirt("run", "--oci", str(images["busybox"]), "no-such-program", timeout=120)
    assert r.code == 127 and "pyvirt-oci: cannot run no-such-program: No such file or directory" in r.err
    r = pyvirt("run", "--oci", str(images["dir"] / "nothing"), "true", timeout=60)
    assert r.code == 1 and r.err.count("\n") == 1 and "no such image" in r.err


def test_the_second_run_converts_nothing(images) -> None:
    cache = Path(os.environ["PYVIRT_OCI_CACHE"])
    pyvirt("run", "--oci", str(images["busybox"]), "true", timeout=300)
    disks = list((cache / "images").glob("*/rootfs.ext4"))
    assert len(disks) == 1
    before = disks[0].stat().st_mtime_ns
    r = pyvirt("run", "--oci", str(images["busybox.tar"]), "true", timeout=120)
    assert r.code == 0 and disks[0].stat().st_mtime_ns == before
    assert len(list((cache / "images").glob("*/rootfs.ext4"))) == 1


def test_debian_entrypoint(debian) -> None:
    r = pyvirt("run", "--oci", str(debian), "--memory", "512M", "bash", "-c", "echo $BASH_VERSION | cut -c1",
               timeout=600)
    assert r.code == 0, r.err
    assert r.out.startswith("debian entrypoint: ") and r.out.endswith("\n5\n"), r.out


def _shell_on_a_pty(con: PtyConsole, prompt: bytes, status: int) -> None:
    """At `prompt`: the shell is on /dev/pts/0; Ctrl-C interrupts its foreground command (not
    the shell); `exit status` ends the run with that status."""
    try:
        con.expect(prompt)
        con.send(b"tty; echo $((6*7))\n")
        con.expect(rb"/dev/pts/0\s+42")
        con.send(b"sleep 100\n")
        time.sleep(2)
        con.send(b"\x03")
        con.send(b"echo after-$?\n")
        con.expect(rb"after-130")
        con.send(b"exit %d\n" % status)
        assert con.wait_exit(60) == status
    finally:
        con.kill()


def test_debian_interactive_tty_and_ctrl_c(debian) -> None:
    con = PtyConsole("--oci", str(debian), "--memory", "512M", "-it", timeout=300)
    con.expect(rb"debian entrypoint")
    _shell_on_a_pty(con, rb"[#$] $", 3)


def test_pid1_forwards_signals_and_reaps_orphans(images) -> None:
    """SIGTERM sent to PID 1 reaches the process (its trap runs), and an orphaned child is
    reaped by PID 1 (no zombie left)."""
    script = ('trap "echo got-term; exit 9" TERM; sh -c "sleep 0 & exit 0"; sleep 1; '
              'echo zombies=$(cat /proc/[0-9]*/stat | grep -c ") Z "); kill -TERM 1; '
              'i=0; while [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done; echo not-forwarded')
    r = pyvirt("run", "--oci", str(images["busybox"]), "-u", "root", "sh", "-c", script, timeout=120)
    assert (r.code, r.out) == (9, "zombies=0\ngot-term\n"), r.err


def test_snapshot_and_restore_go_on(images, tmp_path) -> None:
    """A container VM snapshots and restores as any VM does (its disk is a qcow2 overlay on the
    base disk; with --snapshot-after the process writes to the console)."""
    loop = "i=0; while :; do i=$((i+1)); echo n=$i; sleep 1; done"
    r = pyvirt("run", "--oci", str(images["busybox"]), "--snapshot-after", f"30:{tmp_path / 'snap'}",
               "sh", "-c", loop, timeout=300)
    assert r.code == 0, r.err
    seen = [int(x) for x in re.findall(r"n=(\d+)", r.out)]
    assert seen, r.out
    r = pyvirt("run", "--restore", str(tmp_path / "snap"), "--timeout", "8", timeout=120)
    after = [int(x) for x in re.findall(r"n=(\d+)", r.out)]
    assert after and after[0] == seen[-1] + 1, (seen, r.out)


def test_a_published_port_reaches_the_container(images) -> None:
    """-p HOST:GUEST (with the user network it implies): busybox httpd in the container answers
    on the host's 127.0.0.1."""
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--oci", str(images["busybox"]), "-p", f"{port}:8080",
                          "-u", "root", "sh", "-c", "echo hello-web > /tmp/index.html; httpd -f -p 8080 -h /tmp"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + stretch(120)
        body = b""
        while time.monotonic() < deadline and p.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as r:
                    body = r.read()
                break
            except OSError:
                time.sleep(1)
        assert body == b"hello-web\n", p.stderr.read1() if p.poll() is not None else "no answer"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(60)


def test_a_signal_to_pyvirt_run_reaches_the_process(images) -> None:
    """The first SIGINT pyvirt run receives goes to the container's process (its trap runs and
    its exit status is the run's), as docker run's signal proxy does."""
    import signal
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--oci", str(images["busybox"]), "sh", "-c",
                          'trap "echo got-int; exit 4" INT; echo ready; while :; do sleep 0.2; done'],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert (p.returncode, out) == (4, b"got-int\n"), err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_busybox_interactive_tty(images) -> None:
    """-it: a shell on a pseudo-terminal of the image's devpts; Ctrl-C interrupts the foreground
    command, not the shell; the shell's exit status is the run's."""
    con = PtyConsole("--oci", str(images["busybox"]), "-it", "-u", "root", "sh", timeout=300)
    _shell_on_a_pty(con, rb"/work # (\x1b\[6n)?$", 5)        # (ash asks a terminal where its cursor is)
