"""One VM request (issue 13 item 3, issue 18 item 4): `pyvirt create` takes the VM flags of
`pyvirt run` (both parsers come from request.OPTIONS) and pyvirtd resolves them with the same
resolver: port forwards, vports, --bios, --mmu, --no-rng, --image debian with --root-disk,
relative paths (made absolute by the CLI, not looked up in the daemon's directory)."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from pyvirt import request
from pyvirt.images.debian_image import DEBIAN_IMAGE_VERSION, PACKAGES, scripts_digest
from pyvirt.testing.cli import one_line_error, run
from pyvirt.testing.daemon import Daemon, wait_for


def _flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {f for a in sub.choices[command]._actions if a.help != argparse.SUPPRESS for f in a.option_strings}


def test_create_has_every_vm_flag_of_run() -> None:
    """What `run` has and `create` lacks is declared run-only in the one table (how this
    process runs the VM), and the reverse the daemon's host limits; nothing else differs."""
    from pyvirt.cli import _parser
    p = _parser()
    run_flags, create_flags = _flags(p, "run"), _flags(p, "create")
    run_only = {f for o in request.OPTIONS if o.verbs == {request.RUN} for f in o.flags}
    create_only = {f for o in request.OPTIONS if o.verbs == {request.CREATE} for f in o.flags}
    assert run_flags - create_flags == run_only | {"--jail"}   # (--jail: cli.py's own; pyvirtd jails every runner)
    assert create_flags - run_flags == create_only | {"--state-dir"}
    for flag in ("--port", "--vport", "--image", "--root-disk", "--bios", "--mmu", "--no-rng"):
        assert flag in create_flags
    # (--vsock: a pyvirtd VM always has one, on a socket in its own directory)
    assert run_only == {"--timeout", "--stats", "--quiet", "-q", "--restore", "--overlay-dir", "--snapshot-after",
                        "--rm", "--vsock"}
    # every VM option is a VmRequest field, and every field but the name has its flag
    fields = {o.field for o in request.OPTIONS if o.field}
    assert fields | {"oci_args"} == set(request.VmRequest.model_fields)    # (oci_args: run's CMD words)


def usage_error(capsys: pytest.CaptureFixture[str], args: list[str], words: str) -> None:
    from pyvirt.cli import main
    with pytest.raises(SystemExit) as e:
        main(args)
    one_line_error((e.value.code, *capsys.readouterr()), words)


def test_create_port_vport_bios_and_relative_paths(bare_daemon: Daemon, capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = str(bare_daemon.state)
    monkeypatch.chdir(tmp_path)                       # not the daemon's directory
    Path("Image").write_bytes(b"\0" * 4096)
    Path("fw.elf").write_bytes(b"\x7fELF" + b"\0" * 4092)
    Path("d.img").write_bytes(b"\0" * 65536)
    Path("proj").mkdir()
    code, out, err = run(capsys, "create", "web", "--kernel", "Image", "--disk", "d.img,ro", "--port", "8080:80",
                         "--port", "2222:22", "--vport", "data=data.sock", "--mmu", "sv48", "--no-rng",
                         "--share", "proj:work,ro", "--state-dir", state)
    assert code == 0, err
    spec = bare_daemon.client.inspect("web")["spec"]
    assert spec["kernel"] == str(tmp_path / "Image")
    assert spec["disks"][0]["path"] == str(tmp_path / "d.img") and spec["disks"][0]["read_only"]
    assert [n["backend"] for n in spec["nets"]] == ["user"]
    assert spec["nets"][0]["ports"] == [[8080, 80], [2222, 22]]
    assert spec["ports"] == [{"name": "data", "socket": str(tmp_path / "data.sock")}]
    assert spec["mmu"] == "sv48" and spec["rng"] is False
    assert spec["shares"] == [{"path": str(tmp_path / "proj"), "tag": "work", "read_only": True}]
    assert "pyvirt.share=work:ro" in spec["append"]
    code, out, err = run(capsys, "create", "bare", "--bios", "fw.elf", "--memory", "64M", "--state-dir", state)
    assert code == 0, err
    spec = bare_daemon.client.inspect("bare")["spec"]
    assert spec["bios"] == str(tmp_path / "fw.elf") and spec["kernel"] is None
    # the run's errors, the same words
    one_line_error(run(capsys, "create", "x", "--kernel", "Image", "--port", "80", "--state-dir", state),
                   "--port 80: expected HOST:GUEST")
    one_line_error(run(capsys, "create", "x", "--kernel", "Image", "--net", "tap=t0", "--port", "8080:80",
                       "--state-dir", state), "--port needs a user network")
    one_line_error(run(capsys, "create", "x", "--kernel", "Image", "--vport", "data", "--state-dir", state),
                   "--vport data: expected NAME=SOCKET-PATH")
    one_line_error(run(capsys, "create", "x", "--bios", "nope.elf", "--state-dir", state),
                   f"--bios {tmp_path / 'nope.elf'}: no such file")
    one_line_error(run(capsys, "create", "x", "--kernel", "Image", "--share", "nodir:t", "--state-dir", state),
                   f"--share {tmp_path / 'nodir'}:t: no such directory")
    one_line_error(run(capsys, "create", "x", "--kernel", "Image", "--root-disk", "r.qcow2", "--state-dir", state),
                   "--root-disk goes with --image debian")
    usage_error(capsys, ["create", "x", "--timeout", "5", "--state-dir", state],
                "--timeout goes with pyvirt run (a pyvirtd VM runs until `pyvirt stop`) (see 'pyvirt create --help')")
    usage_error(capsys, ["create", "x", "--quiet", "--state-dir", state], "--quiet goes with pyvirt run")
    usage_error(capsys, ["run", "--memory-limit", "1G"], "--memory-limit goes with pyvirt create")
    assert [v["name"] for v in bare_daemon.client.list()] == ["web", "bare"]


@pytest.fixture
def debian_cache(tmp_path: Path) -> Path:
    """A cache holding a (fake) Debian image that cached_debian_image() accepts."""
    d = tmp_path / "cache" / "debian-test"
    d.mkdir(parents=True)
    for name in ("Image", "initrd.cpio"):
        (d / name).write_bytes(b"\0" * 4096)
    (d / "disk.img").write_bytes(b"\0" * (4 << 20))
    (d / "manifest.json").write_text(json.dumps({"version": DEBIAN_IMAGE_VERSION, "scripts_sha256": scripts_digest(),
                                                 "packages": list(PACKAGES), "built": "2026-01-01"}))
    return d


def test_create_debian_with_its_root_disk(state_dir: Path, debian_cache: Path, capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--image debian --root-disk PATH` under pyvirtd resolves as `pyvirt run` does: the cached
    image's kernel, initrd and command line, 1G, the root disk a qcow2 overlay made over the image,
    --command after systemd; not booted (minutes)."""
    d = Daemon(state_dir, env={"PYVIRT_CACHE": str(debian_cache.parent)})
    try:
        monkeypatch.chdir(tmp_path)
        state = str(state_dir)
        code, out, err = run(capsys, "create", "deb", "--image", "debian", "--root-disk", "root.qcow2",
                             "--disk", "data.img", "--command", "uname -a", "--state-dir", state)
        assert code != 0 and "--disk" in err and "no such file" in err          # (checked before anything is made)
        Path("data.img").write_bytes(b"\0" * 65536)
        code, out, err = run(capsys, "create", "deb", "--image", "debian", "--root-disk", "root.qcow2",
                             "--disk", "data.img", "--command", "uname -a", "--port", "2222:22", "--state-dir", state)
        assert code == 0, err
        spec = d.client.inspect("deb")["spec"]
        assert spec["kernel"] == str(debian_cache / "Image") and spec["initrd"] == str(debian_cache / "initrd.cpio")
        assert spec["memory"] == 1 << 30
        assert [(x["path"], x["format"]) for x in spec["disks"]] == [(str(tmp_path / "root.qcow2"), "qcow2"),
                                                                     (str(tmp_path / "data.img"), "auto")]
        assert spec["append"].startswith("console=ttyS0 root=/dev/vda")
        assert "TERM=dumb" in spec["append"] and "pyvirt.cmd=" in spec["append"]
        assert spec["nets"][0]["ports"] == [[2222, 22]]
        info = subprocess.run(["qemu-img", "info", "--output=json", "root.qcow2"], capture_output=True, text=True)
        if info.returncode == 0:
            assert json.loads(info.stdout)["backing-filename"] == str(debian_cache / "disk.img")
        else:
            assert Path("root.qcow2").read_bytes()[:4] == b"QFI\xfb"
        one_line_error(run(capsys, "create", "deb2", "--image", "debian", "--state-dir", state),
                       "--image debian under pyvirtd needs --root-disk PATH")
        one_line_error(run(capsys, "create", "deb2", "--image", "debian", "--root-disk", "r2.qcow2",
                           "--kernel", "data.img", "--state-dir", state), "--image debian brings its own kernel")
        assert not Path("r2.qcow2").exists()
        # the API makes no file but a PATH.qcow2 at an absolute path in an existing directory
        from pyvirt.host.client import ApiError
        for root_disk, words in (("r3.qcow2", "must be an absolute path"),
                                 (str(tmp_path / "r3.img"), "a new root disk is a PATH.qcow2"),
                                 (str(tmp_path / "no" / "r3.qcow2"), "a new root disk is a PATH.qcow2"),
                                 (str(tmp_path), "not a file")):
            with pytest.raises(ApiError, match=words):
                d.client.create("deb3", image="debian", root_disk=root_disk)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data.img", "root.qcow2"]
    finally:
        d.cleanup()


def test_created_vm_serves_its_vport(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    """A VM created with --vport (which `pyvirt create` used to refuse) runs with the port: what
    the guest writes to /dev/virtio-ports/data reaches the host's socket."""
    sock = daemon.state / "d.sock"
    code, _, err = run(capsys, "create", "vp", "--memory", "64M", "--vport", f"data={sock}",
                       "--command", "echo hello-from-guest > /dev/virtio-ports/data; sleep 1000",
                       "--state-dir", str(daemon.state))
    assert code == 0, err
    code, out, err = run(capsys, "start", "vp", "--state-dir", str(daemon.state))
    assert code == 0 and "running" in out, err
    wait_for(sock.exists, 60, "the vport's socket")
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(sock))
    c.settimeout(120)
    with c, c.makefile("rb") as f:
        assert f.readline() == b"hello-from-guest\n"


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")
def test_created_vm_forwards_its_port(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    """A VM created with --port (which `pyvirt create` used to refuse) serves the host's port."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cmd = "mkdir -p /www && echo served-by-pyvirtd > /www/index.html && httpd -p 80 -h /www && sleep 1000"
    code, _, err = run(capsys, "create", "web", "--memory", "64M", "--port", f"{port}:80", "--command", cmd,
                       "--state-dir", str(daemon.state))
    assert code == 0, err
    assert run(capsys, "start", "web", "--state-dir", str(daemon.state))[0] == 0

    def page() -> bytes:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as resp:
                return resp.read()
        except OSError:                      # not up yet: passt resets the connection
            return b""

    assert wait_for(page, 180, "the guest's web server", interval=0.5) == b"served-by-pyvirtd\n"
