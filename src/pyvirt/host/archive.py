"""VM export archives: one zstd-compressed tar stream (`.pyvirt`, `.tar.zst`).

Members, in this order::

    pyvirt-export.json      format "pyvirt-export", version, created, name, the VM's spec
                            with paths rewritten to member names, its host limits, and
                            every other member's name and size
    boot/kernel, boot/initrd, boot/bios   the files the spec boots (so the archive is
                            self-contained, the cached default guest's included)
    disks/diskN.raw         each disk's whole content as a raw image: a qcow2 disk is read
                            through its backing chain (flattened), so nothing refers to
                            host paths.  Zero runs compress to almost nothing; import
                            writes them back as holes.
    snapshot/manifest.json, snapshot/state.json, snapshot/ram
                            with `export --snapshot`: the snapshot (vmm/snapshot.py's
                            format) whose disks are the archive's disks/diskN.raw (the
                            VM is exported as of the snapshot).  Its manifest is
                            "portable": its disks and the spec's disk and boot paths are
                            member names, and it lists no diskN.qcow2 (the overlays are
                            made afresh on import, see install_snapshot).  The manifest
                            comes second in the stream, so its format and version are
                            checked before any large member is written.

Import reads the stream once (with `TarReader`, a strict and bounded reader of the tar
subset written here, not `tarfile`) into a new directory beside the VM directories and
checks as it goes: the manifest first (format, version, at most MAX_MEMBERS members,
sizes within MAX_TOTAL), then every member against it (a regular file with a name the
manifest lists -- no absolute path, no "..", no links or devices -- and exactly its
declared size), then that every listed member came.  Only then does the directory
become the VM's and its record is added; on any failure the directory is removed and
nothing else exists.  Errors are one-line `ArchiveError`s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import IO, Any

from pyvirt.fsutil import open_regular
from pyvirt.oci.tar import TarFormatError, header_block, pax_records, read_up_to, tar_number
from pyvirt.vmm import snapfiles

FORMAT = "pyvirt-export"
VERSION = 1
MANIFEST = "pyvirt-export.json"
MAX_MANIFEST = 1 << 20
MAX_MEMBERS = 64
MAX_TOTAL = 1 << 40
CHUNK = 1 << 20
HOLE = 64 << 10
_ZERO = bytes(CHUNK)
SNAP_DIR = "snapshot"
INCOMPLETE = ".incomplete"   # in a directory being imported: a daemon that died meanwhile removes it
SNAP_MANIFEST, SNAP_STATE, SNAP_RAM = (f"{SNAP_DIR}/{name}"
                                       for name in (snapfiles.MANIFEST, snapfiles.STATE, snapfiles.RAM))


def disk_member(i: int) -> str:
    """The archive member holding disk i (raw); the snapshot's manifest names the same."""
    return f"disks/{snapfiles.image_name(i)}"


class ArchiveError(Exception):
    """A one-line reason the archive cannot be written or read."""


class _DiskReader:
    """A BlockBackend as a file object (tarfile reads it in chunks)."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.pos = backend, 0

    def read(self, n: int = -1) -> bytes:
        n = self.backend.size - self.pos if n < 0 else min(n, self.backend.size - self.pos)
        buf = bytearray(n)
        if n:
            self.backend.readinto(self.pos, memoryview(buf))
        self.pos += n
        return bytes(buf)


def _info(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = size, 0o600, int(time.time())
    return ti


def portable_snapshot(m: dict[str, Any]) -> dict[str, Any]:
    """A snapshot manifest as it goes into the archive: disk and boot paths become the
    archive's member names (the VM's disks are the snapshot's), no diskN.qcow2 is listed."""
    m = json.loads(json.dumps(m))
    spec = m["spec"]
    for key in ("kernel", "initrd", "bios"):
        if spec.get(key):
            spec[key] = f"boot/{key}"
    for i, (saved, disk) in enumerate(zip(m["disks"], spec["disks"])):
        saved.update(path=disk_member(i), format="raw")
        disk.update(path=disk_member(i), format="raw")
    m["files"] = {k: v for k, v in m["files"].items() if k in (snapfiles.STATE, snapfiles.RAM)}
    return m


def export_vm(out: Path, name: str, spec: dict[str, Any], limits: dict[str, Any],
              snapshot: tuple[str, Path, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the archive of a VM that is not running to `out`, which must not exist.  It is
    written beside `out` under a temporary name and linked into place (never replacing
    anything); returns the manifest.  `snapshot`: (name, directory, portable manifest) of
    the snapshot `spec` is taken from, exported with it."""
    from pyvirt.backends.disk import open_disk

    out = Path(out).expanduser().absolute()
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} exists already")
    spec = json.loads(json.dumps(spec))
    files: list[tuple[str, Path | bytes | None, Any]] = []   # (member, host file or bytes, or disk backend)
    if snapshot is not None:
        head = json.dumps(snapshot[2], indent=1).encode()
        files += [(SNAP_MANIFEST, head, None), (SNAP_STATE, snapshot[1] / snapfiles.STATE, None)]
    for key in ("kernel", "initrd", "bios"):
        if spec.get(key):
            files.append((f"boot/{key}", Path(spec[key]), None))
            spec[key] = f"boot/{key}"
    backends = []
    try:
        for i, disk in enumerate(spec.get("disks", [])):
            b = open_disk(disk["path"], read_only=True, fmt=disk.get("format", "auto"))
            backends.append(b)
            files.append((disk_member(i), None, b))
            disk.update(path=disk_member(i), format="raw")
        if snapshot is not None:
            files.append((SNAP_RAM, snapshot[1] / snapfiles.RAM, None))
        members = {m: (len(p) if isinstance(p, bytes) else p.stat().st_size if p is not None else b.size)
                   for m, p, b in files}
        manifest = {"format": FORMAT, "version": VERSION, "name": name,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "spec": spec, "limits": limits, "members": members}
        if snapshot is not None:
            manifest["snapshot"] = snapshot[0]
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            _write(tmp, manifest, files)
            os.link(tmp, out)                  # fails if `out` appeared meanwhile: nothing replaced
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        for b in backends:
            b.close()
    return manifest


def _write(tmp: Path, manifest: dict[str, Any], files: list[tuple[str, Path | bytes | None, Any]]) -> None:
    import zstandard

    with open(tmp, "xb") as raw, zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw) as z, \
            tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        head = json.dumps(manifest, indent=1).encode()
        tar.addfile(_info(MANIFEST, len(head)), _Bytes(head))
        for member, path, backend in files:
            if isinstance(path, bytes):
                tar.addfile(_info(member, len(path)), _Bytes(path))
            elif path is not None:
                with open(path, "rb") as f:
                    tar.addfile(_info(member, manifest["members"][member]), f)
            else:
                tar.addfile(_info(member, backend.size), _DiskReader(backend))


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return out


# -- import ---------------------------------------------------------------------------------
def _member_ok(name: str) -> bool:
    p = PurePosixPath(name)
    return (bool(name) and name.isprintable() and not p.is_absolute() and ".." not in p.parts and "\\" not in name
            and len(p.parts) == 2 and p.parts[0] in ("boot", "disks", SNAP_DIR) and not p.name.startswith("."))


def _check_manifest(raw: bytes) -> dict[str, Any]:
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError):
        raise ArchiveError(f"{MANIFEST} is not valid JSON") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArchiveError(f"not a pyvirt export archive ({MANIFEST} does not say format {FORMAT!r})")
    if m.get("version") != VERSION:
        raise ArchiveError(f"archive format version {m.get('version')!r} is not supported "
                           f"(this pyvirt reads version {VERSION})")
    members = m.get("members")
    if not isinstance(members, dict) or len(members) > MAX_MEMBERS or not isinstance(m.get("spec"), dict):
        raise ArchiveError(f"{MANIFEST} lacks a spec or a valid member list")
    for name, size in members.items():
        if not _member_ok(name):
            raise ArchiveError(f"unsafe or unknown member name {name[:80]!r} in the archive")
        if type(size) is not int or size < 0:
            raise ArchiveError(f"member {name}: invalid size in {MANIFEST}")
    if sum(members.values()) > MAX_TOTAL:
        raise ArchiveError("the archive declares more than 1 TiB of files")
    if members.get(SNAP_MANIFEST, 0) > MAX_MANIFEST:
        raise ArchiveError(f"{SNAP_MANIFEST} is larger than {MAX_MANIFEST} bytes")
    snap = {n for n in members if n.startswith(SNAP_DIR + "/")}
    if "snapshot" in m or snap:
        import re

        from pyvirt.host.models import NAME_RE
        if not isinstance(m.get("snapshot"), str) or not re.fullmatch(NAME_RE, m["snapshot"]):
            raise ArchiveError(f"{MANIFEST}: the snapshot's name is missing or invalid")
        if snap != {SNAP_MANIFEST, SNAP_STATE, SNAP_RAM}:
            raise ArchiveError(f"the snapshot's members are not exactly {SNAP_MANIFEST}, {SNAP_STATE} and {SNAP_RAM}")
    return m


def _check_snapshot_head(path: Path) -> dict[str, Any]:
    """The snapshot's (portable) manifest, checked as soon as it is unpacked: format and
    version (before the large members are written), then its disks and files."""
    from pyvirt.vmm import snapshot as fmt
    try:
        m = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise ArchiveError(f"{SNAP_MANIFEST} is not valid JSON") from None
    if not isinstance(m, dict) or m.get("format") != fmt.FORMAT:
        raise ArchiveError(f"{SNAP_MANIFEST} is not a pyvirt snapshot manifest (format is not {fmt.FORMAT!r})")
    if m.get("version") != fmt.VERSION:
        raise ArchiveError(f"the snapshot's format version {m.get('version')!r} is not supported "
                           f"(this pyvirt reads version {fmt.VERSION})")
    files, disks, spec = m.get("files"), m.get("disks"), m.get("spec")
    if not isinstance(files, dict) or not isinstance(disks, list) or not isinstance(spec, dict) \
            or not isinstance(spec.get("disks"), list) or len(spec["disks"]) != len(disks):
        raise ArchiveError(f"{SNAP_MANIFEST} lacks files, spec or disks")
    if set(files) != {fmt.STATE, fmt.RAM}:
        raise ArchiveError(f"{SNAP_MANIFEST} must list exactly {fmt.STATE} and {fmt.RAM}")
    for i, (saved, disk) in enumerate(zip(disks, spec["disks"])):
        member = disk_member(i)
        if not isinstance(saved, dict) or saved.get("kind") not in ("frozen", "shared") \
                or saved.get("path") != member or not isinstance(disk, dict) or disk.get("path") != member:
            raise ArchiveError(f"{SNAP_MANIFEST}: disk {i} is not the archive's {member}")
    return m


def _copy_sparse(src: IO[bytes], dst: Path, size: int) -> None:
    """Exactly `size` bytes from `src`; all-zero 64 KiB blocks become holes."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        done = 0
        while done < size:
            chunk = src.read(min(CHUNK, size - done))
            if not chunk:
                raise ArchiveError(f"the archive is truncated in {dst.name}")
            if chunk != _ZERO[:len(chunk)]:
                for off in range(0, len(chunk), HOLE):           # holes down to 64 KiB
                    part = chunk[off:off + HOLE]
                    if part != _ZERO[:len(part)]:
                        os.pwrite(fd, part, done + off)
            done += len(chunk)
        os.ftruncate(fd, size)
        os.fsync(fd)                      # durable before the daemon records what names it
    finally:
        os.close(fd)


def fsync_tree(top: Path) -> None:
    """fsync the directories under `top` (and `top`): the names of files already fsynced are
    durable too."""
    for d in [top, *(p for p in top.rglob("*") if p.is_dir() and not p.is_symlink())]:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def unpack(archive: Path, dest: Path) -> dict[str, Any]:
    """Check and unpack `archive` into the new directory `dest` (removed again on any
    failure); returns the manifest with the spec's paths made absolute under `dest`."""
    import zstandard

    archive = Path(archive).expanduser()
    try:
        f = open_regular(archive)                   # (a FIFO would hold the daemon's thread)
    except (OSError, ValueError) as e:              # (ValueError: a NUL in the path)
        raise ArchiveError(f"cannot open {str(archive)[:200]!r}: {getattr(e, 'strerror', None) or e}") from None
    dest.mkdir(mode=0o700)
    (dest / INCOMPLETE).touch(mode=0o600)      # until the daemon has recorded it (see Manager.recover)
    try:
        with f, zstandard.ZstdDecompressor().stream_reader(f) as z:
            m = _unpack_members(TarReader(z), dest)
        fsync_tree(dest)
        return _localize(m, dest)
    except ArchiveError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (TarFormatError, zstandard.ZstdError, EOFError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError(f"{archive} is not a valid archive (corrupt or truncated: {e})") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


class TarMember:
    __slots__ = ("name", "size", "type")

    def __init__(self, name: str, size: int, type_: bytes) -> None:
        self.name, self.size, self.type = name, size, type_

    def isfile(self) -> bool:
        return self.type in (b"0", b"\0")


class TarReader:
    """A strict, bounded reader of the tar subset export writes (tarfile's PAX format):
    ustar headers (checksummed), PAX extended headers of at most MAX_PAX bytes (`path` and
    `size` are used, other keys ignored), regular files; other member types are reported
    (not regular files: refused by the caller), GNU long names and anything else malformed
    is a TarFormatError.  At most MAX_HEADERS headers are read, so a small archive cannot
    make it parse or hold much: tarfile reads a PAX header of any size into memory and
    parses it in quadratic time."""

    MAX_PAX = 64 << 10
    MAX_HEADERS = 4 * (MAX_MEMBERS + 1)

    def __init__(self, src: Any) -> None:
        self.src = src
        self.left = 0              # unread bytes of the current member's data and padding
        self.headers = 0
        self.done = False

    def _read(self, n: int) -> bytes:
        return read_up_to(self.src, n)

    def _skip(self) -> None:
        while self.left:
            n = len(self._read(min(self.left, CHUNK)))
            if not n:
                raise EOFError("the archive ends inside a member")
            self.left -= n

    def _header(self) -> bytes | None:
        self.headers += 1
        if self.headers > self.MAX_HEADERS:
            raise TarFormatError(f"more than {self.MAX_HEADERS} tar headers")
        block = self._read(512)
        if not header_block(block, EOFError("the archive ends inside a tar header")):
            self.done = True
            return None
        return block

    def next(self) -> TarMember | None:
        self._skip()
        pax: dict[str, str] = {}
        while not self.done:
            block = self._header()
            if block is None:
                return None
            size = tar_number(block[124:136])
            kind = block[156:157]
            if kind in (b"x", b"g"):
                if size > self.MAX_PAX:
                    raise TarFormatError(f"a PAX header is larger than {self.MAX_PAX} bytes")
                data = self._read(size)
                if len(data) < size:
                    raise EOFError("the archive ends inside a PAX header")
                self._read(-size % 512)
                if kind == b"x":
                    try:
                        pax.update({k: v.decode("utf-8") for k, v in pax_records(data).items()})
                    except UnicodeDecodeError:
                        raise TarFormatError("a PAX header is not UTF-8") from None
                continue
            if kind in (b"L", b"K"):
                raise TarFormatError("GNU long-name headers are not part of the format")
            name = block[:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            try:
                text = pax["path"] if "path" in pax else name.decode("utf-8")
                size = int(pax["size"]) if "size" in pax else size
            except (UnicodeDecodeError, ValueError):
                raise TarFormatError("a tar header's name or size is malformed") from None
            if size < 0:
                raise TarFormatError("a tar header's size is malformed")
            member = TarMember(text, size if kind in (b"0", b"\0", b"7") else 0, kind)
            self.left = member.size + (-member.size % 512)
            return member
        return None

    def extractfile(self, member: TarMember) -> Any:
        reader = self

        class _Data:
            def read(self, n: int = -1) -> bytes:
                want = reader.left - (-member.size % 512)      # data left, not the padding
                n = want if n < 0 else min(n, want)
                data = reader._read(n) if n > 0 else b""
                if len(data) < n:
                    raise EOFError(f"the archive is truncated in {member.name[:80]}")
                reader.left -= len(data)
                return data
        return _Data()


def _unpack_members(tar: TarReader, dest: Path) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile() or first.size > MAX_MANIFEST:
        raise ArchiveError(f"not a pyvirt export archive (it does not start with {MANIFEST})")
    src = tar.extractfile(first)
    assert src is not None
    m = _check_manifest(src.read())
    seen: set[str] = set()
    while (ti := tar.next()) is not None:
        if not _member_ok(ti.name) or ti.name not in m["members"]:
            raise ArchiveError(f"unsafe or unlisted member {ti.name[:80]!r} in the archive")
        if not ti.isfile():
            raise ArchiveError(f"member {ti.name} is not a regular file (links and devices are refused)")
        if ti.name in seen or ti.size != m["members"][ti.name]:
            raise ArchiveError(f"member {ti.name} is repeated or not the size {MANIFEST} declares")
        seen.add(ti.name)
        (dest / PurePosixPath(ti.name).parent).mkdir(mode=0o700, exist_ok=True)
        data = tar.extractfile(ti)
        assert data is not None
        _copy_sparse(data, dest / ti.name, ti.size)
        if ti.name == SNAP_MANIFEST:
            _check_snapshot_head(dest / ti.name)
    missing = sorted(set(m["members"]) - seen)
    if missing:
        raise ArchiveError(f"the archive is truncated: {missing[0]} is missing")
    return m


def _localize(m: dict[str, Any], dest: Path) -> dict[str, Any]:
    spec = m["spec"]
    for key in ("kernel", "initrd", "bios"):
        if spec.get(key) is not None:
            spec[key] = _local(spec[key], m, dest)
    disks = spec.get("disks")
    if isinstance(disks, list):
        for d in disks:
            if not isinstance(d, dict):
                raise ArchiveError("the spec's disks are malformed")
            d["path"] = _local(d.get("path"), m, dest)
    return m


# What of an archive's spec an imported VM keeps: the guest's own hardware, and limits
# on its disks (which only restrict it).  Nothing that reaches the host: its disks are
# the archive's members opened as the raw images they are (never probed, so never a
# qcow2 naming a backing file); its network interfaces and port sockets are the
# importing user's, its host limits the importing user's or the defaults.
GUEST_FIELDS = ("cpus", "memory", "kernel", "initrd", "append", "bios", "rng", "engine", "mmu")
DISK_FIELDS = ("read_only", "bw", "iops", "burst")


def trusted_spec(spec: Any, nets: list[dict[str, Any]], ports: dict[str, str] | None = None) -> dict[str, Any]:
    """The spec an imported VM (or snapshot) gets from the archive's `spec` (paths already
    local): its guest fields, its disks as format=raw with their limits, `nets` (the
    importer's; each keeps the archive's MAC where there is one to keep) and, for a
    snapshot, its ports at the sockets `ports` gives (by name)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("disks", []), list) \
            or not isinstance(spec.get("nets", []), list) or not isinstance(spec.get("ports", []), list):
        raise ArchiveError("the spec is malformed")
    out = {k: spec[k] for k in GUEST_FIELDS if k in spec}
    disks = []
    for d in spec.get("disks", []):
        if not isinstance(d, dict):
            raise ArchiveError("the spec's disks are malformed")
        disks.append({"path": d.get("path"), "format": "raw", **{k: d[k] for k in DISK_FIELDS if k in d}})
    out["disks"] = disks
    saved_nets = spec.get("nets", [])
    new_nets = []
    for i, n in enumerate(nets):
        n = dict(n)
        old = saved_nets[i] if i < len(saved_nets) else None
        if isinstance(old, dict) and isinstance(old.get("mac"), str):
            n["mac"] = old["mac"]
        new_nets.append(n)
    out["nets"] = new_nets
    out["ports"] = []
    if spec.get("vsock") is not None:
        # the device stays (a snapshot's state has it); its socket is the runner's own, which
        # replaces this placeholder (host/runner.py), never a path from the archive
        out["vsock"] = {"socket": "vsock.sock"}
    if ports is not None:
        for p in spec.get("ports", []):
            name = p.get("name") if isinstance(p, dict) else None
            if not isinstance(name, str) or name not in ports:
                raise ArchiveError("the snapshot's console ports are malformed")
            out["ports"].append({"name": name, "socket": ports[name]})
    return out


def _local(member: Any, m: dict[str, Any], dest: Path) -> str:
    if not isinstance(member, str) or member not in m["members"]:
        raise ArchiveError(f"the spec names {str(member)[:80]!r}, which is not in the archive")
    return str(dest / member)


def install_snapshot(unpacked: Path, dest: Path, nets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Make the new directory `dest` a self-contained snapshot (vmm/snapshot.py's format)
    from the snapshot members of the archive unpacked in `unpacked`: its state and RAM
    are moved in; each disk's image (the archive's disks/diskN.raw, a sparse copy: the
    imported VM writes its own) becomes `diskN.raw`, read-only, and a frozen disk gets
    its empty overlay `diskN.qcow2` over it as a snapshot taken here would; the boot
    files are linked in as `boot-KEY` (a VM restored from it boots from them when
    started again).  The manifest then names these files (sizes, the overlays' sha256)
    and must pass `read_manifest`.  Its spec is `trusted_spec`'s: the network interfaces
    are `nets` (the importer's, as many as the snapshot saved), its console ports' sockets
    lie in `dest`.  On any failure `dest` is removed; returns the manifest."""
    from pydantic import ValidationError

    from pyvirt.backends.qcow2_tools import create_qcow2
    from pyvirt.errors import ConfigError
    from pyvirt.spec import VmSpec
    from pyvirt.vmm import snapshot as fmt

    m = _check_snapshot_head(unpacked / SNAP_MANIFEST)
    dest.mkdir(mode=0o700)
    (dest / INCOMPLETE).touch(mode=0o600)      # until the daemon has recorded it (see Manager.recover)
    try:
        spec, files = m["spec"], m["files"]
        for name in (fmt.STATE, fmt.RAM):
            os.rename(unpacked / SNAP_DIR / name, dest / name)
            (dest / name).chmod(0o444)
        for i, (saved, disk) in enumerate(zip(m["disks"], spec["disks"])):
            image = dest / snapfiles.image_name(i)
            src = unpacked / saved["path"]
            if not src.is_file() or src.is_symlink():
                raise ArchiveError(f"the snapshot's disk {i} is not in the archive")
            with open(src, "rb") as f:
                _copy_sparse(f, image, src.stat().st_size)
            image.chmod(0o444)
            files[image.name] = {"size": image.stat().st_size}
            saved.update(path=str(image), format="raw")
            disk.update(path=str(image), format="raw")
            if saved["kind"] == "frozen":
                overlay = dest / snapfiles.overlay_name(i)
                create_qcow2(overlay, None, backing=image, backing_format="raw")
                overlay.chmod(0o444)
                files[overlay.name] = {"size": overlay.stat().st_size,
                                       "sha256": hashlib.sha256(overlay.read_bytes()).hexdigest()}
        saved_nets = spec.get("nets", [])
        if not isinstance(saved_nets, list) or len(saved_nets) != len(nets or []):
            n = len(saved_nets) if isinstance(saved_nets, list) else 0
            raise ArchiveError(f"the snapshot has {n} network interface(s): import it with as many "
                               f"--net (the archive's own are never used), not {len(nets or [])}")
        ports = {p["name"]: str(dest / f"port-{i}.sock") for i, p in enumerate(spec.get("ports", []))
                 if isinstance(p, dict) and isinstance(p.get("name"), str)}
        spec = m["spec"] = trusted_spec(spec, nets or [], ports)
        for key in ("kernel", "initrd", "bios"):
            if spec.get(key) is not None:
                if spec[key] != f"boot/{key}" or not (unpacked / spec[key]).is_file():
                    raise ArchiveError(f"the snapshot's spec names {str(spec[key])[:80]!r} as its {key}, "
                                       "which is not in the archive")
                copy = dest / f"boot-{key}"
                try:
                    os.link(unpacked / spec[key], copy)        # boot files are never written
                except OSError:
                    shutil.copyfile(unpacked / spec[key], copy)
                files[copy.name] = {"size": copy.stat().st_size}
                spec[key] = str(copy)
        (dest / fmt.MANIFEST).write_text(json.dumps(m, indent=1) + "\n")
        with open(dest / fmt.MANIFEST, "rb") as f:
            os.fsync(f.fileno())
        for name in (fmt.STATE, fmt.RAM):
            with open(dest / name, "rb") as f:
                os.fsync(f.fileno())
        try:
            out = fmt.read_manifest(dest)
            VmSpec.model_validate(out["spec"])
        except ConfigError as e:
            raise ArchiveError(str(e)) from None
        except ValidationError as e:
            raise ArchiveError(f"the snapshot's spec is invalid: {e.errors()[0]['msg']}") from None
        if out["memory"] != spec["memory"] or files[fmt.RAM]["size"] != fmt.ram_file_size(spec["memory"]):
            raise ArchiveError("the snapshot's RAM size does not match its spec")
        shutil.rmtree(unpacked / SNAP_DIR)
        fsync_tree(dest)
        return out
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
