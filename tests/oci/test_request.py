"""--oci through request.OPTIONS and resolve(): pyvirt run's CMD words, the flags, pyvirtd's spec."""

from __future__ import annotations

import argparse

import pytest

from pyvirt import request
from pyvirt.errors import ConfigError
from pyvirt.images import cached_default_image
from pyvirt.testing import oci as t


def _args(*argv: str) -> request.VmRequest:
    p = argparse.ArgumentParser()
    request.add_arguments(p, request.RUN)
    return request.from_args(p.parse_args(list(argv)), request.RUN)


def test_run_flags_and_the_cmd_words() -> None:
    req = _args("--oci", "img", "-e", "A=1", "-e", "B", "-w", "/w", "-u", "app", "-it", "-p", "8080:80",
                "sh", "-c", "exit 7")
    assert (req.oci, req.env, req.workdir, req.user, req.tty, req.interactive) == \
        ("img", ["A=1", "B"], "/w", "app", True, True)
    assert req.oci_args == ["sh", "-c", "exit 7"] and req.ports == ["8080:80"]
    assert _args("--oci", "img").oci_args == []


def test_misplaced_flags_are_one_line() -> None:
    with pytest.raises(ConfigError, match="CMD goes with --oci IMAGE"):
        request.resolve(_args("echo", "hi"))
    with pytest.raises(ConfigError, match="-e/-w/-u/-t/-v goes with --oci IMAGE"):
        request.resolve(_args("-e", "A=1"))
    with pytest.raises(ConfigError, match="-e/-w/-u/-t/-v goes with --oci IMAGE"):
        request.resolve(_args("-v", "/tmp:/data"))
    with pytest.raises(ConfigError, match=r"--oci runs the image's process on the default kernel"):
        request.resolve(_args("--oci", "img", "--image", "debian"))


def test_the_daemon_spec_keeps_its_disk_and_writes_to_the_console(tmp_path, oci_cache, busybox_layers,
                                                                 busybox_config) -> None:
    if cached_default_image() is None:
        pytest.skip("the default image is not built")
    t.write_layout(tmp_path / "bb", busybox_config, busybox_layers)
    req = request.request(oci=str(tmp_path / "bb"), root_disk=str(tmp_path / "vm.qcow2"))
    with pytest.raises(ConfigError, match="needs --root-disk"):
        request.resolve(request.request(oci=str(tmp_path / "bb")), daemon=True)
    got = request.resolve(req, daemon=True)
    spec = got.spec
    assert "pyvirt.oci=console" in spec.append and "rdinit=/pyvirt-oci/init" in spec.append
    assert spec.initrd is not None and spec.initrd.parent == oci_cache / "initrd"
    assert spec.disks[0].path == tmp_path / "vm.qcow2" and spec.disks[0].format == "qcow2"
    from pyvirt.backends.qcow2_tools import describe_image
    assert str(describe_image(str(tmp_path / "vm.qcow2"))["backing_file"]).endswith("rootfs.ext4")
    assert got.pipe is None and got.overlay_dir is None
    data = spec.initrd.read_bytes()
    assert data.startswith(cached_default_image().initrd.read_bytes())      # the default initramfs, then ours
    tail = data[len(cached_default_image().initrd.read_bytes()):]
    assert b"pyvirt-oci/exec" in tail and b"pyvirt-oci/init" in tail
    assert b"Ash\0EPATH=/bin\0EGREETING=hello\0" in tail and b"W/work\0U1000\0G1000\0S50\0S1000\0Iconsole\0" in tail
