"""pyvirtd runs a container image (pyvirt create --oci): its process writes to the VM's log, its
exit status is the VM's, its disk is a kept qcow2 overlay on the image's base disk, and it
snapshots and clones as any VM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.images import cached_default_image
from pyvirt.testing import oci as t
from pyvirt.testing.daemon import Daemon, counts, wait_for


@pytest.fixture
def oci_daemon(state_dir: Path, tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    """A daemon with a private PYVIRT_OCI_CACHE, and the busybox test image's layout."""
    if cached_default_image() is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    layers = t.busybox_layers(t.busybox_binary())
    t.write_layout(tmp_path / "bb", t.image_config(layers, **t.BUSYBOX_CONFIG), layers)
    d = Daemon(state_dir, env={"PYVIRT_OCI_CACHE": str(tmp_path / "cache")})
    try:
        yield d, tmp_path / "bb"
    finally:
        d.cleanup()


def test_a_daemon_vm_runs_the_image(oci_daemon, tmp_path: Path) -> None:
    d, image = oci_daemon
    c = d.client
    c.create("box", memory="128M", oci=str(image), root_disk=str(tmp_path / "box.qcow2"),
             oci_args=["sh", "-c", "echo hi from $(hostname) as $(id -u) in $(pwd); exit 3"])
    c.start("box")
    vm = wait_for(lambda: (v := c.inspect("box"))["state"] == "stopped" and v, 120, "power-off")
    assert vm["exit_status"] == 3, vm
    assert "hi from box as 1000 in /work" in c.logs("box")["text"]
    from pyvirt.backends.qcow2_tools import describe_image
    info = describe_image(str(tmp_path / "box.qcow2"))             # the kept overlay on the base disk
    assert str(info["backing_file"]).endswith("rootfs.ext4") and not info["check"].errors
    r = d.cli("create", "bad", "--oci", str(tmp_path / "nothing"), "--root-disk", str(tmp_path / "b.qcow2"))
    assert r.returncode == 1 and "no such image" in r.stderr and r.stderr.count("\n") == 1


def test_a_container_vm_snapshots_and_clones(oci_daemon, tmp_path: Path) -> None:
    """Snapshots and clones of a container VM work unchanged: its disk is an ordinary qcow2
    overlay on the base disk, and the clones go on counting where the snapshot was taken."""
    d, image = oci_daemon
    c = d.client
    c.create("counter", memory="128M", oci=str(image), root_disk=str(tmp_path / "c.qcow2"),
             oci_args=["sh", "-c", "i=0; while :; do i=$((i+1)); echo C=$i; sleep 0.2; done"])
    c.start("counter")
    wait_for(lambda: "C=5" in c.logs("counter")["text"], 120, "the counter")
    c.snapshot("counter", "gold")
    at = max(counts(c.logs("counter")["text"]))
    for vm in c.clone("gold", 2, prefix="copy"):
        wait_for(lambda vm=vm: any(n > at for n in counts(c.logs(vm["name"])["text"])), 120,
                 f"{vm['name']} counting on")


def test_a_container_vm_exports_and_imports(oci_daemon, tmp_path: Path) -> None:
    """An exported container VM carries its disk (flattened) and boot files: the imported VM
    sees what the first run wrote and runs the same process."""
    d, image = oci_daemon
    c = d.client
    c.create("box", memory="128M", oci=str(image), root_disk=str(tmp_path / "box.qcow2"),
             oci_args=["sh", "-c", "echo run-$(cat /work/n 2>/dev/null || echo first); echo second > /work/n; exit 3"])
    c.start("box")
    wait_for(lambda: c.inspect("box")["state"] == "stopped", 120, "power-off")
    assert "run-first" in c.logs("box")["text"]
    c.export("box", tmp_path / "box.pyvirt")
    c.import_(tmp_path / "box.pyvirt", name="copy")
    c.start("copy")
    vm = wait_for(lambda: (v := c.inspect("copy"))["state"] == "stopped" and v, 120, "the copy's power-off")
    assert vm["exit_status"] == 3 and "run-second" in c.logs("copy")["text"]
