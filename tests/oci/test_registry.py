"""Pulling from a local registry (Debian's docker-registry, started here): by tag and by
digest, a second pull from the cache, a tampered blob refused with nothing cached."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.oci import BlobStore, OciError, resolve_image
from pyvirt.oci.source import Registry
from pyvirt.testing import oci as t

REGISTRY = shutil.which("docker-registry")
pytestmark = pytest.mark.skipif(REGISTRY is None, reason="docker-registry is not installed "
                                                         "(scripts/setup-system.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(HOST:PORT, storage directory) of a registry on 127.0.0.1."""
    d = tmp_path_factory.mktemp("registry")
    port = _free_port()
    (d / "config.yml").write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                                  f"    rootdirectory: {d / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen([REGISTRY, "serve", str(d / "config.yml")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "log", "wb"))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"the registry did not start: {(d / 'log').read_text()[-500:]}")
                time.sleep(0.2)
        yield f"localhost:{port}", d / "data"
    finally:
        proc.terminate()
        proc.wait(10)


def test_pull_by_tag_and_digest_then_from_the_cache(registry, oci_cache, busybox_layers, busybox_config) -> None:
    host, _ = registry
    digest = t.push(f"http://{host}", "pyvirt/busybox", "1", busybox_config, busybox_layers)
    by_tag = Registry.from_ref(f"{host}/pyvirt/busybox:1", BlobStore())
    img = by_tag.image()
    assert by_tag.downloads == 2 + len(busybox_layers)          # manifest, config, layers
    assert img.config["config"]["User"] == "app"
    by_digest = Registry.from_ref(f"{host}/pyvirt/busybox@{digest}", BlobStore())
    assert by_digest.image().digest == img.digest
    assert by_digest.downloads == 0                              # every blob was cached
    again = Registry.from_ref(f"{host}/pyvirt/busybox:1", BlobStore())
    assert again.image().digest == img.digest and again.downloads == 0
    assert resolve_image(f"{host}/pyvirt/busybox:1").digest == img.digest


def test_a_tampered_blob_is_refused_and_nothing_cached(registry, oci_cache) -> None:
    host, data = registry
    layer = t.layer([("only-here", "file", os.urandom(8192))])     # a blob no other test shares
    config = t.image_config([layer], Cmd=["sh"])
    t.push(f"http://{host}", "pyvirt/tampered", "1", config, [layer])
    import gzip
    import hashlib
    layer_hex = hashlib.sha256(gzip.compress(layer, mtime=0)).hexdigest()
    stored = data / "docker/registry/v2/blobs/sha256" / layer_hex[:2] / layer_hex / "data"
    body = bytearray(stored.read_bytes())
    body[100] ^= 0xFF
    stored.write_bytes(bytes(body))
    with pytest.raises(OciError, match=f"blob sha256:{layer_hex[:12]}: digest mismatch .* refused"):
        resolve_image(f"{host}/pyvirt/tampered:1")
    blobs = os.listdir(oci_cache / "blobs" / "sha256")
    assert layer_hex not in blobs and not [b for b in blobs if b.startswith(".")]


def test_registry_errors_are_one_line(registry, oci_cache) -> None:
    host, _ = registry
    with pytest.raises(OciError, match="the registry answered 404"):
        resolve_image(f"{host}/pyvirt/missing:1")
    with pytest.raises(OciError, match="cannot reach the registry"):
        resolve_image(f"localhost:{_free_port()}/pyvirt/busybox:1")
    with pytest.raises(OciError, match="is not a valid repository name"):
        resolve_image(f"{host}/Bad Name:1")


def test_a_multi_platform_index_gives_its_riscv64_image(registry, oci_cache, busybox_layers,
                                                        busybox_config) -> None:
    host, _ = registry
    base = f"http://{host}"
    other = t.image_config(busybox_layers[:1], architecture="amd64", Cmd=["sh"])
    amd = t.push(base, "pyvirt/multi", "amd64", other, busybox_layers[:1])
    rv = t.push(base, "pyvirt/multi", "riscv64", busybox_config, busybox_layers)
    t.push_index(base, "pyvirt/multi", "1", [(amd, {"os": "linux", "architecture": "amd64"}),
                                              (rv, {"os": "linux", "architecture": "riscv64"})])
    img = resolve_image(f"{host}/pyvirt/multi:1")
    assert img.config["architecture"] == "riscv64" and img.config["config"]["User"] == "app"
    t.push_index(base, "pyvirt/multi", "x86", [(amd, {"os": "linux", "architecture": "amd64"})])
    with pytest.raises(OciError, match="no linux/riscv64 image; it has linux/amd64$"):
        resolve_image(f"{host}/pyvirt/multi:x86")
