"""Image sources: an OCI image layout directory, a `docker save` tarball or a registry reference,
each resolved to one linux/riscv64 image whose blobs are all in the BlobStore.

    img = resolve_image("busybox.oci")                 # a layout directory (DIR or DIR:TAG)
    img = resolve_image("busybox.tar")                 # docker save / docker-archive
    img = resolve_image("localhost:5000/busybox:1")    # registry API v2 (or NAME@sha256:...)
    img.config, img.layers, img.digest

A reference names a registry when it is not an existing path and its first component has a
"." or ":" or is "localhost"; localhost and 127.0.0.1 are spoken to over HTTP, everything else
over HTTPS.  Every blob is digest-checked as it streams into the cache (store.py).  A tag
or path seen before resolves from the cache (refs/) without reading the source again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvirt.oci.store import (
    MAX_BLOB,
    MAX_JSON,
    BlobStore,
    OciError,
    check_digest,
    file_chunks,
    parse_json,
    reader,
)
from pyvirt.oci.tar import TarFormatError, TarReader

PLATFORM = ("linux", "riscv64")
MAX_DEPTH = 4                   # an index inside an index inside ...
MAX_LAYERS = 128
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
TIMEOUT = 60.0
_NAME = re.compile(r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass
class Image:
    """One resolved image: its config and layers (digests of blobs in the store)."""

    source: str
    digest: str                      # the config's digest: the image's identity here
    config: dict[str, Any]
    layers: list[str]
    diff_ids: list[str] = field(default_factory=list)


def resolve_image(ref: str, store: BlobStore | None = None) -> Image:
    store = store or BlobStore()
    path = Path(ref).expanduser()
    base, _, tag = ref.rpartition(":")
    if path.is_dir():
        return _layout(path, None, store)
    if base and ":" not in tag and "/" not in tag and Path(base).expanduser().is_dir():
        return _layout(Path(base).expanduser(), tag, store)
    if path.is_file():
        return _docker_archive(path, store)
    if is_registry_ref(ref):
        return Registry.from_ref(ref, store).image()
    raise OciError(f"{ref}: no such image (not a directory, a file or a registry reference HOST[:PORT]/NAME[:TAG])")


def is_registry_ref(ref: str) -> bool:
    first = ref.split("/", 1)[0]
    return "/" in ref and ("." in first or ":" in first or first == "localhost")


def _finish(source: str, store: BlobStore, manifest: dict[str, Any]) -> Image:
    """The Image of a manifest whose blobs are in the store; checks the platform."""
    config_d = check_digest(_dict(manifest.get("config"), "manifest config").get("digest"), "config")
    config = store.json(config_d, "the image config")
    _check_platform(source, config)
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise OciError(f"{source}: the manifest's layers are not a list of at most {MAX_LAYERS}")
    digests = [check_digest(_dict(layer, "layer").get("digest"), "layer") for layer in layers]
    rootfs = _dict(config.get("rootfs", {}), "config rootfs")
    diff_ids = rootfs.get("diff_ids", [])
    if not isinstance(diff_ids, list) or len(diff_ids) != len(digests):
        raise OciError(f"{source}: the config names {len(diff_ids) if isinstance(diff_ids, list) else 0} "
                       f"layers, the manifest {len(digests)}")
    return Image(source, config_d, config, digests, [check_digest(d, "diff_id") for d in diff_ids])


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OciError(f"{what} is not a JSON object")
    return value


def _check_platform(source: str, config: dict[str, Any]) -> None:
    got = (config.get("os"), config.get("architecture"))
    if got != PLATFORM:
        raise OciError(f"{source}: the image is for {got[0]}/{got[1]}; pyvirt runs linux/riscv64 images")


def _platforms(index: dict[str, Any]) -> list[str]:
    out = []
    for m in index.get("manifests", []) if isinstance(index.get("manifests"), list) else []:
        p = m.get("platform") if isinstance(m, dict) else None
        if isinstance(p, dict):
            out.append(f"{p.get('os')}/{p.get('architecture')}" + (f"/{p['variant']}" if p.get("variant") else ""))
    return out


def _pick(source: str, index: dict[str, Any]) -> dict[str, Any]:
    """The linux/riscv64 entry of a multi-platform index (one without a platform when it is
    the only one: an OCI layout's index.json)."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise OciError(f"{source}: the index lists no manifests")
    for m in entries:
        p = _dict(m, "index entry").get("platform")
        if isinstance(p, dict) and (p.get("os"), p.get("architecture")) == PLATFORM:
            return m
    if len(entries) == 1 and not isinstance(entries[0].get("platform"), dict):
        return _dict(entries[0], "index entry")
    raise OciError(f"{source}: no linux/riscv64 image; it has {', '.join(_platforms(index)) or 'no platforms'}")


def _walk(source: str, store: BlobStore, top: dict[str, Any], fetch: Any) -> dict[str, Any]:
    """From an index or a manifest down to the image manifest; `fetch(digest)` brings a JSON blob
    into the store.  Indexes nest at most MAX_DEPTH deep and never revisit a digest (a loop)."""
    seen: set[str] = set()
    node = top
    for _ in range(MAX_DEPTH + 1):
        if "manifests" in node:
            entry = _pick(source, node)
            digest = check_digest(entry.get("digest"), "manifest")
            if digest in seen:
                raise OciError(f"{source}: the index refers back to {digest[:19]} (a manifest loop)")
            seen.add(digest)
            fetch(digest, entry)
            node = store.json(digest, "a manifest")
            continue
        if "layers" in node and "config" in node:
            return node
        raise OciError(f"{source}: neither an image manifest nor an index")
    raise OciError(f"{source}: indexes nested more than {MAX_DEPTH} deep (a manifest loop?)")


# -- an OCI image layout directory ---------------------------------------------------------------
def _layout(root: Path, tag: str | None, store: BlobStore) -> Image:
    source = str(root) + (f":{tag}" if tag else "")
    if not (root / "oci-layout").is_file() or not (root / "index.json").is_file():
        raise OciError(f"{source}: not an OCI image layout (no oci-layout or index.json)")
    with reader(root / "index.json") as f:
        index = parse_json(f.read(MAX_JSON + 1), f"{source}: index.json")
    if tag is not None:
        entries: list[Any] = index["manifests"] if isinstance(index.get("manifests"), list) else []
        named = [m for m in entries if isinstance(m, dict) and isinstance(m.get("annotations"), dict)
                 and m["annotations"].get("org.opencontainers.image.ref.name") == tag]
        if not named:
            raise OciError(f"{source}: the layout has no image named {tag}")
        index = {"manifests": named}

    def copy(digest: str, _entry: Any = None) -> None:
        if not store.has(digest):
            with reader(root / "blobs" / "sha256" / digest[7:]) as f:
                store.put(digest, file_chunks(f), what=f"{source}: blob")

    manifest = _walk(source, store, index, copy)
    copy(check_digest(_dict(manifest.get("config"), "config").get("digest"), "config"))
    for layer in manifest.get("layers", [])[:MAX_LAYERS]:
        copy(check_digest(_dict(layer, "layer").get("digest"), "layer"))
    return _finish(source, store, manifest)


# -- a docker save tarball ----------------------------------------------------------------------
def _docker_archive(path: Path, store: BlobStore) -> Image:
    """Read the archive once: every regular member goes into the store under its own digest
    (nothing vouches for it yet: the config's diff_ids check the layers when applied), then
    manifest.json says which are the config and the layers."""
    source = str(path)
    st = path.stat()
    key = "archive-" + hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()
                                      ).hexdigest()[:24]
    known = store.ref(key)
    if known and isinstance(known.get("manifest"), dict):
        try:
            return _finish(source, store, known["manifest"])
        except (OSError, OciError):
            pass
    names: dict[str, str] = {}
    links: dict[str, str] = {}
    manifest_data: bytes | None = None
    try:
        with reader(path) as f:
            tar = TarReader(f)
            while (m := tar.next()) is not None:
                name = os.path.normpath(m.name.lstrip("/"))
                if m.kind == "symlink":
                    links[name] = os.path.normpath(os.path.join(os.path.dirname(name), m.linkname))
                if m.kind != "file":
                    continue
                if name == "manifest.json":
                    if m.size > MAX_JSON:
                        raise OciError(f"{source}: manifest.json is larger than {MAX_JSON} bytes")
                    manifest_data = tar.read(m.size)
                    continue
                names[name] = _store_unknown(store, iter(tar.read, b""))
    except TarFormatError as e:
        raise OciError(f"{source}: not a docker archive ({e})") from None
    if manifest_data is None:
        raise OciError(f"{source}: not a docker archive (no manifest.json)")
    try:
        entries = json.loads(manifest_data)
    except ValueError:
        raise OciError(f"{source}: manifest.json is not valid JSON") from None
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
        raise OciError(f"{source}: manifest.json must describe exactly one image")
    entry = entries[0]

    def digest_of(name: Any) -> str:
        if not isinstance(name, str):
            raise OciError(f"{source}: manifest.json names a member that is not a string")
        n = os.path.normpath(name)
        for _ in range(8):
            if n not in links:
                break
            n = links[n]
        if n not in names:
            raise OciError(f"{source}: manifest.json names {name[:80]}, which the archive lacks")
        return names[n]
    layers = entry.get("Layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise OciError(f"{source}: manifest.json's Layers is not a list of at most {MAX_LAYERS}")
    manifest = {"config": {"digest": digest_of(entry.get("Config"))},
                "layers": [{"digest": digest_of(x)} for x in layers]}
    img = _finish(source, store, manifest)
    store.set_ref(key, {"manifest": manifest})
    return img


def _store_unknown(store: BlobStore, chunks: Any) -> str:
    """Store a blob whose digest is learnt by reading it (a docker archive's members)."""
    return store.put_unknown(chunks, MAX_BLOB, f"a docker archive member is larger than {MAX_BLOB} bytes")


# -- a registry (HTTP API v2) -------------------------------------------------------------------
class Registry:
    """One repository on a registry: GET /v2/NAME/manifests/REF and /v2/NAME/blobs/DIGEST."""

    def __init__(self, host: str, name: str, reference: str, store: BlobStore, source: str) -> None:
        self.host, self.name, self.reference, self.store, self.source = host, name, reference, store, source
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0][1:]
        scheme = "http" if hostname in ("localhost", "127.0.0.1", "::1") else "https"
        self.base = f"{scheme}://{host}/v2/{name}"
        self.downloads = 0           # blobs fetched over the network (a cache hit fetches none)

    @classmethod
    def from_ref(cls, ref: str, store: BlobStore) -> Registry:
        host, _, rest = ref.partition("/")
        if "@" in rest:
            name, _, reference = rest.partition("@")
            check_digest(reference, ref)
        else:
            name, sep, reference = rest.rpartition(":")
            if not sep or "/" in reference:
                name, reference = rest, "latest"
            elif not _TAG.fullmatch(reference):
                raise OciError(f"{ref}: {reference!r} is not a valid tag")
        if not _NAME.fullmatch(name):
            raise OciError(f"{ref}: {name!r} is not a valid repository name")
        return cls(host, name, reference, store, ref)

    def _get(self, url: str, accept: str | None = None) -> Any:
        req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        try:
            return urllib.request.urlopen(req, timeout=TIMEOUT)   # noqa: S310 (http(s) only, built above)
        except urllib.error.HTTPError as e:
            raise OciError(f"{self.source}: the registry answered {e.code} {e.reason} for {url.split('/v2/', 1)[1][:100]}") \
                from None
        except (urllib.error.URLError, OSError) as e:
            raise OciError(f"{self.source}: cannot reach the registry at {self.host} "
                           f"({getattr(e, 'reason', None) or e})") from None

    def _fetch_manifest(self, reference: str) -> tuple[str, dict[str, Any]]:
        """(digest, manifest or index): from the store when `reference` is a stored digest."""
        if reference.startswith("sha256:") and self.store.has(reference):
            return reference, self.store.json(reference, "a manifest")
        with self._get(f"{self.base}/manifests/{reference}", ", ".join(INDEX_TYPES + MANIFEST_TYPES)) as r:
            data = r.read(MAX_JSON + 1)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise OciError(f"{self.source}: the manifest's digest is {digest[:19]}, not {reference[:19]}: refused")
        value = parse_json(data, f"{self.source}: the manifest")
        self.downloads += 1
        self.store.put_bytes(digest, data, "manifest")
        return digest, value

    def _blob(self, digest: str, entry: Any = None) -> None:
        if self.store.has(digest):
            return
        if isinstance(entry, dict) and entry.get("mediaType") in INDEX_TYPES + MANIFEST_TYPES:
            self._fetch_manifest(digest)
            return
        size = entry.get("size") if isinstance(entry, dict) else None
        limit = size if isinstance(size, int) and size >= 0 else None
        with self._get(f"{self.base}/blobs/{digest}") as r:
            self.downloads += 1
            if limit is None:
                self.store.put(digest, file_chunks(r), what=f"{self.source}: blob")
            else:
                self.store.put(digest, file_chunks(r), limit, what=f"{self.source}: blob")

    def image(self) -> Image:
        key = "registry-" + hashlib.sha256(f"{self.host}/{self.name}:{self.reference}".encode()).hexdigest()[:24]
        known = self.store.ref(key)
        if known and isinstance(known.get("manifest"), str) and self.store.has(known["manifest"]):
            manifest = self.store.json(known["manifest"], "a manifest")
            try:
                if all(self.store.has(d["digest"]) for d in [manifest["config"], *manifest["layers"]]):
                    return _finish(self.source, self.store, manifest)
            except (KeyError, TypeError, OciError):
                pass
        top_digest, top = self._fetch_manifest(self.reference)
        chosen: list[str] = []

        def fetch(digest: str, entry: Any) -> None:
            chosen.append(digest)
            self._fetch_manifest(digest)
        manifest = _walk(self.source, self.store, top, fetch)
        config = _dict(manifest.get("config"), "config")
        self._blob(check_digest(config.get("digest"), "config"), config)
        layers = manifest.get("layers")
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise OciError(f"{self.source}: the manifest's layers are not a list of at most {MAX_LAYERS}")
        for layer in layers:
            self._blob(check_digest(_dict(layer, "layer").get("digest"), "layer"), layer)
        img = _finish(self.source, self.store, manifest)
        self.store.set_ref(key, {"manifest": chosen[-1] if chosen else top_digest})
        return img
