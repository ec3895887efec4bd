"""Test images for pyvirt.oci, built from what this project can reach.

    busybox_layers()        riscv64 busybox from Debian's busybox-static (verified through the
                            signed archive, images/debian.py) plus layers exercising whiteouts,
                            opaque directories, hard links, symlinks, setuid bits and xattrs
    write_layout(dir, ...)  an OCI image layout (gzip layers, an index)
    write_docker_archive(path, ...)   a `docker save` tarball (plain tar layers)
    layer(entries)          one layer tar from (path, kind, ...) tuples (tarfile, PAX format)

The busybox image's config: Env PATH and GREETING=hello, WorkingDir /work, User app (1000:1000
in its /etc/passwd), Cmd ["sh"].
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

APPLETS = ("sh", "echo", "cat", "ls", "id", "env", "pwd", "sleep", "true", "false", "stat", "readlink",
           "test", "printf", "hostname", "getfattr", "tty", "kill", "mkdir", "touch", "rm", "find", "wc", "httpd")

Entry = tuple[Any, ...]      # (path, "file", data[, mode, uid, gid, xattrs]) | (path, "dir"[, mode, uid, gid])
#                              (path, "symlink", target) | (path, "hardlink", target) | (path, "whiteout")
#                              (path, "char", major, minor, mode)


def layer(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            path, kind = e[0], e[1]
            ti = tarfile.TarInfo(path)
            ti.mtime = 1_700_000_000
            if kind == "file":
                data = e[2]
                ti.size = len(data)
                ti.mode = e[3] if len(e) > 3 else 0o644
                ti.uid, ti.gid = (e[4], e[5]) if len(e) > 5 else (0, 0)
                if len(e) > 6:
                    ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e[6].items()}
                tar.addfile(ti, io.BytesIO(data))
                continue
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                ti.mode = e[2] if len(e) > 2 else 0o755
                ti.uid, ti.gid = (e[3], e[4]) if len(e) > 4 else (0, 0)
            elif kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e[2], 0o777
            elif kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e[2]
            elif kind == "char":
                ti.type, ti.devmajor, ti.devminor, ti.mode = tarfile.CHRTYPE, e[2], e[3], e[4]
            elif kind == "whiteout":
                ti.size = 0
            tar.addfile(ti)
    return out.getvalue()


def busybox_binary() -> bytes:
    from pyvirt.images.debian import DebFile, DebianArchive
    from pyvirt.images.initramfs import ARCH, BUSYBOX_PACKAGE, BUSYBOX_PATHS, SUITE
    archive = DebianArchive(SUITE, ARCH)
    deb = DebFile(archive.download_package(archive.package(BUSYBOX_PACKAGE)))
    names = set(deb.names())
    return deb.read(next(p for p in BUSYBOX_PATHS if p in names))


def busybox_layers(busybox: bytes) -> list[bytes]:
    base: list[Entry] = [("bin", "dir"), ("bin/busybox", "file", busybox, 0o755)]
    base += [(f"bin/{a}", "symlink", "busybox") for a in APPLETS]
    base += [("etc", "dir"), ("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\n"
                                                    b"app:x:1000:1000:app:/home/app:/bin/sh\n"),
             ("etc/group", "file", b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n"),
             ("home", "dir"), ("home/app", "dir", 0o750, 1000, 1000), ("work", "dir", 0o775, 1000, 1000),
             ("gone", "file", b"removed by a whiteout\n"), ("opaque", "dir"), ("opaque/old", "file", b"old\n"),
             ("opaque/sub", "dir"), ("opaque/sub/deep", "file", b"deep\n"), ("tmp", "dir", 0o1777)]
    second: list[Entry] = [
        (".wh.gone", "whiteout"), ("opaque", "dir"), ("opaque/.wh..wh..opq", "whiteout"),
        ("opaque/new", "file", b"new\n"),
        ("data", "dir", 0o755, 1000, 1000), ("data/file", "file", b"linked\n", 0o640, 1000, 50),
        ("data/hard", "hardlink", "data/file"), ("data/link", "symlink", "../etc/passwd"),
        ("data/suid", "file", b"#!/bin/sh\n", 0o4755), ("data/sgid", "file", b"x", 0o2711, 0, 50),
        ("data/attr", "file", b"x", 0o644, 0, 0, {"user.pyvirt": "yes", "trusted.pyvirt": "t"}),
        ("data/sticky", "dir", 0o1777), ("data/null", "char", 1, 3, 0o666)]
    third: list[Entry] = [("data/hard2", "hardlink", "data/file"), ("etc/motd", "file", b"third layer\n")]
    return [layer(base), layer(second), layer(third)]


def image_config(layers: list[bytes], **config: Any) -> dict[str, Any]:
    return {"architecture": config.pop("architecture", "riscv64"), "os": "linux",
            "config": config, "rootfs": {"type": "layers",
                                         "diff_ids": ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]}}


BUSYBOX_CONFIG = {"Env": ["PATH=/bin", "GREETING=hello"], "WorkingDir": "/work", "User": "app", "Cmd": ["sh"]}


def _blob(root: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def manifest_bytes(config_desc: dict[str, Any], layer_descs: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **d}
                                  for d in layer_descs]}).encode()


def write_layout(root: Path, config: dict[str, Any], layers: list[bytes], tag: str = "latest",
                 index_platform: bool = True) -> str:
    """An OCI layout at `root` (gzip layers); returns the manifest's digest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    cfg = _blob(root, json.dumps(config).encode())
    descs = [_blob(root, gzip.compress(x, mtime=0)) for x in layers]
    man = manifest_bytes(cfg, descs)
    mdesc = _blob(root, man)
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **mdesc,
             "annotations": {"org.opencontainers.image.ref.name": tag}}
    if index_platform:
        entry["platform"] = {"os": config["os"], "architecture": config["architecture"]}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return mdesc["digest"]


def write_docker_archive(path: Path, config: dict[str, Any], layers: list[bytes], tag: str = "busybox:1") -> None:
    cfg = json.dumps(config).encode()
    chex = hashlib.sha256(cfg).hexdigest()
    names = [f"{hashlib.sha256(x).hexdigest()}/layer.tar" for x in layers]
    man = json.dumps([{"Config": f"{chex}.json", "RepoTags": [tag], "Layers": names}]).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(f"{chex}.json", cfg), *zip(names, layers), ("manifest.json", man)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))


def push(base: str, name: str, tag: str, config: dict[str, Any], layers: list[bytes]) -> str:
    """Push an image to a registry at `base` (http://HOST:PORT) with the API v2 monolithic
    upload; returns the manifest's digest."""
    import urllib.request

    def upload(data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        r = urllib.request.urlopen(urllib.request.Request(f"{base}/v2/{name}/blobs/uploads/", method="POST",
                                                          data=b""), timeout=30)
        loc = r.headers["Location"]
        loc = loc if loc.startswith("http") else base + loc
        sep = "&" if "?" in loc else "?"
        urllib.request.urlopen(urllib.request.Request(f"{loc}{sep}digest={digest}", method="PUT", data=data,
                                                      headers={"Content-Type": "application/octet-stream"}),
                               timeout=60)
        return {"digest": digest, "size": len(data)}

    cfg = upload(json.dumps(config).encode())
    descs = [upload(gzip.compress(x, mtime=0)) for x in layers]
    man = manifest_bytes(cfg, descs)
    urllib.request.urlopen(urllib.request.Request(
        f"{base}/v2/{name}/manifests/{tag}", method="PUT", data=man,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}), timeout=30)
    return "sha256:" + hashlib.sha256(man).hexdigest()


DEBIAN_PRUNED = ("usr/lib/modules", "usr/lib/firmware", "usr/share/doc", "usr/share/man", "usr/share/locale",
                 "usr/share/i18n", "usr/share/info")
DEBIAN_ENTRYPOINT = ["/usr/bin/bash", "-c", 'echo "debian entrypoint: $(cat /etc/debian_version) $*"; exec "$@"',
                     "entrypoint"]


def debian_layer(disk: Path, scratch: Path) -> bytes:
    """One layer holding the cached Debian image's root file system (read with debugfs, no mount:
    /usr, /etc and /var, less DEBIAN_PRUNED, with the merged-/usr links), as a plain tar."""
    import shutil
    import subprocess
    tree = scratch / "debian-root"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    subprocess.run(["debugfs", "-R", f"rdump /usr /etc /var {tree}", str(disk)], check=True, capture_output=True)
    for p in DEBIAN_PRUNED:
        shutil.rmtree(tree / p, ignore_errors=True)
    for name in ("bin", "lib", "sbin"):
        (tree / name).symlink_to(f"usr/{name}")
    for name in ("root", "tmp", "home", "proc", "sys", "dev", "run"):
        (tree / name).mkdir(exist_ok=True)
    out = scratch / "debian-layer.tar"
    subprocess.run(["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "-cf", str(out), "."], check=True)
    shutil.rmtree(tree)
    data = out.read_bytes()
    out.unlink()
    return data


def push_index(base: str, name: str, tag: str, manifests: list[tuple[str, dict[str, str]]]) -> str:
    """Push an image index naming `manifests` ((digest, platform) of manifests already pushed)."""
    import urllib.request
    entries = []
    for digest, platform in manifests:
        with urllib.request.urlopen(urllib.request.Request(
                f"{base}/v2/{name}/manifests/{digest}",
                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}), timeout=30) as r:
            size = len(r.read())
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
                        "platform": platform})
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    urllib.request.urlopen(urllib.request.Request(
        f"{base}/v2/{name}/manifests/{tag}", method="PUT", data=index,
        headers={"Content-Type": "application/vnd.oci.image.index.v1+json"}), timeout=30)
    return "sha256:" + hashlib.sha256(index).hexdigest()
