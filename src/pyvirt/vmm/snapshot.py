"""VM snapshots: save a VM between CPU slices to a directory, restore it as new VMs.

A snapshot directory holds (docs/snapshots.md has the reasons)::

    manifest.json   format "pyvirt-snapshot", version, the VmSpec, RAM size, files
                    with sizes (and sha256 of the small ones); written last
    state.json      every device's, hart's and the clock's state as plain JSON
                    (bytes as base64); checked against a schema before loading
    ram             guest RAM plus one page, a sparse file: zero pages are holes
    diskN.qcow2     for each writable disk: an empty, read-only qcow2 overlay over
                    the disk's frozen image (the VM's top image at snapshot time)
    diskN.img       for each writable disk that is not pyvirt's own (the user's
                    --disk file): a sparse copy of it at snapshot time, the frozen
                    image under diskN.qcow2 -- the VM keeps writing the user's file,
                    which pyvirt never freezes, and a later change to the file does
                    not touch the snapshot

Restoring maps `ram` copy-on-write (MAP_PRIVATE): nothing is read up front,
the file is never written, and VMs restored from one snapshot share its
unmodified pages through the page cache.  Each restored VM writes its disks
through fresh overlays of its own over the snapshot's `diskN.qcow2`.

Frozen images carry a checksum of their contents (the copies in the manifest's
files, images frozen in place in their disk entry): restoring refuses an image
that changed since (a writer that ignored the locks and the read-only mode).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pyvirt.backends.disk import open_disk
from pyvirt.errors import ConfigError
from pyvirt.fsutil import FileTooLarge, read_regular
from pyvirt.memory import PAGE_SIZE, shared_ram
from pyvirt.spec import NetSpec, PortSpec, VmSpec
from pyvirt.state import encode_bytes
from pyvirt.version import __version__
from pyvirt.vmm.snapfiles import MANIFEST, RAM, STATE, copy_name, overlay_name

if TYPE_CHECKING:
    from pyvirt.vmm.vm import Vm

FORMAT = "pyvirt-snapshot"
VERSION = 1
MAX_MANIFEST = 1 << 20
MAX_STATE = 64 << 20
# Zero pages are found a chunk at a time, then page by page inside non-zero chunks.
_CHUNK = 2 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)


def ram_file_size(memory: int) -> int:
    """The RAM file is RAM plus one (zero) page: the mapping covers the bus's tail bytes."""
    return memory + PAGE_SIZE


@dataclass
class Overrides:
    """What a VM restored from a snapshot changes of the saved one.

    `nets`: new network interfaces (backend and MAC), one per saved interface;
    `macs`: only new MAC addresses, one per interface (the virtio-net config MAC);
    `overlay_dir`: where the restored VM's disk overlays go (kept); default a
    temporary directory removed when the VM is closed;
    `engine`: another execution engine (translations are not state);
    `ports`: new host sockets for virtio-console ports, by port name (a VM
    restored next to its original must not bind the original's sockets);
    `vsock`: a new host socket for the virtio-vsock device (the same reason)."""

    nets: list[NetSpec] | None = None
    macs: list[str] | None = None
    overlay_dir: str | Path | None = None
    engine: str | None = None
    ports: dict[str, str | Path] | None = None
    vsock: str | Path | None = None


# -- saving -----------------------------------------------------------------------------
SHARE_REFUSAL = ("snapshot refused: the VM has a shared folder (--share), whose open files live in "
                 "virtiofsd, outside the snapshot; pyvirtd snapshots it with the share unmounted by "
                 "its guest agent (docs/shares.md)")
IN_FLIGHT_WAIT = 2.0                  # seconds for virtiofsd to answer what it still holds


def _check_shares_quiet(vm: Vm) -> None:
    """Every shared folder's rings idle (its FUSE requests answered): a snapshot cannot hold
    work in virtiofsd's hands.  virtiofsd runs on its own, so a request in flight is waited
    for a moment."""
    from pyvirt.devices.virtio.fs import VirtioFs
    devices = [t.device for _, _, t in vm.board.virtio if isinstance(t.device, VirtioFs)]
    end = time.monotonic() + IN_FLIGHT_WAIT
    while busy := [d.tag for d in devices if d.in_flight()]:
        if time.monotonic() > end:
            raise ConfigError(f"snapshot refused: share {busy[0]} still has FUSE requests in "
                              "flight (is it mounted in the guest?)")
        time.sleep(0.01)


def save_snapshot(vm: Vm, directory: str | Path, *, then: str = "continue",
                  live_dir: str | Path | None = None, own_dir: str | Path | None = None,
                  shares_unmounted: bool = False) -> dict[str, Any]:
    """Write a snapshot of `vm` (between slices: the VM is not executing) to `directory`
    (new, or empty); returns the manifest.

    Writable disks whose image lies under `own_dir` (pyvirt's own images, such as a
    pyvirtd VM's directory) are frozen in place: the image becomes read-only for good,
    the snapshot gets an overlay over it, and with `then="continue"` the VM goes on
    writing to a new overlay of its own in `live_dir` (default: `directory`/live), which
    `vm.spec` then names.  Every other writable disk is the user's: the snapshot gets a
    copy of it (diskN.img) and the VM goes on writing the user's file.  With
    `then="quit"` the VM must not run again.

    A VM with a shared folder is snapshotted only when the caller has unmounted every share
    in the guest (`shares_unmounted`: pyvirtd does it through the guest agent) and nothing
    is in flight on their rings: virtiofsd's FUSE state is not saved, and a restored VM
    gets a fresh virtiofsd (docs/shares.md)."""
    if then not in ("continue", "quit"):
        raise ConfigError(f"snapshot: then must be 'continue' or 'quit', not {then!r}")
    if vm.spec.shares:
        if not shares_unmounted:
            raise ConfigError(SHARE_REFUSAL)
        _check_shares_quiet(vm)
    d = Path(directory)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise ConfigError(f"snapshot directory {d} exists and is not empty")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.chmod(0o700)                        # the guest's RAM and state: its owner's alone
    board = vm.board
    started = time.monotonic()
    board.clock.pause()                   # the guest sees no time pass while it is saved
    try:
        state = board.save_state()
        disks = _freeze_disks(vm, d, then, Path(live_dir) if live_dir else d / "live",
                              Path(own_dir).resolve() if own_dir else None)
        files = {STATE: _write_state(d / STATE, state),
                 RAM: _write_ram(d / RAM, board.bus.ram, board.bus.ram_size)}
        for i, disk in enumerate(disks):
            if disk["kind"] == "frozen":
                files[overlay_name(i)] = _file_entry(d / overlay_name(i), digest=True)
            if "copied_from" in disk:
                files[copy_name(i)] = {"size": (d / copy_name(i)).stat().st_size,
                                         "data_sha256": data_digest(d / copy_name(i))}
        manifest = {
            "format": FORMAT, "version": VERSION, "pyvirt": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "spec": _saved_spec(vm, disks),
            "memory": board.bus.ram_size, "disks": disks, "files": files,
            "save_seconds": round(time.monotonic() - started, 3),
        }
        tmp = d / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, d / MANIFEST)      # a manifest means a complete snapshot
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)                  # (durable before anyone records the snapshot)
        finally:
            os.close(dfd)
        return manifest
    finally:
        board.clock.resume()


def _saved_spec(vm: Vm, disks: list[dict[str, Any]]) -> Any:
    """The spec as saved: disks name the frozen images (the live VM's spec already
    names its new overlays)."""
    spec = json.loads(vm.spec.model_dump_json())
    for disk, saved in zip(spec["disks"], disks):
        disk["path"] = saved["path"]
        if saved["kind"] == "frozen":
            disk["format"] = saved["format"]
    return spec


def _freeze_disks(vm: Vm, d: Path, then: str, live_dir: Path, own_dir: Path | None) -> list[dict[str, Any]]:
    from pyvirt.backends.qcow2_tools import create_qcow2
    board = vm.board
    out: list[dict[str, Any]] = []
    blks = [t.device for _, _, t in board.virtio if hasattr(t.device, "backend")
            and t.device.backend in board.backends]
    frozen: list[Path] = []
    for i, (disk, backend) in enumerate(zip(vm.spec.disks, board.backends)):
        path = Path(disk.path).resolve()
        if disk.read_only:
            out.append({"kind": "shared", "path": str(path), "size": backend.size})
            continue
        fmt = getattr(backend, "format", "raw")
        backend.flush()
        if own_dir is None or not path.is_relative_to(own_dir):
            out.append(_copy_users_disk(d, i, path, fmt, backend.size))
            continue
        backend.close()                   # written back and unlocked: from now on only read
        frozen.append(path)
        mine = d / overlay_name(i)
        create_qcow2(mine, None, backing=path, backing_format=fmt)
        mine.chmod(0o444)
        out.append({"kind": "frozen", "path": str(path), "format": fmt, "size": backend.size,
                    "data_sha256": data_digest(path)})
        if then == "continue":
            live_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            live = (live_dir / overlay_name(i)).resolve()
            create_qcow2(live, None, backing=path, backing_format=fmt)
            new = open_disk(live, fmt="qcow2")
            board.backends[i] = new
            for blk in blks:
                if blk.backend is backend:
                    blk.backend = new
            vm.spec.disks[i] = disk.model_copy(update={"path": live, "format": "qcow2"})   # limits kept
    # Whoever records where the VM writes (the daemon's runner) is told before the old images
    # become read-only for good: a process killed in between leaves a record naming images
    # that can still be opened -- the old ones, unchanged since, or the new overlays.
    for hook in getattr(vm, "disks_moved", ()):
        hook()
    for path in frozen:
        with contextlib.suppress(OSError):
            mode = path.stat().st_mode
            path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return out


def _copy_users_disk(d: Path, i: int, path: Path, fmt: str, size: int) -> dict[str, Any]:
    """The snapshot's own copy of the user's disk `path` (written back, still open in
    the VM, which goes on writing it): diskN.img, read-only, and the overlay diskN.qcow2
    over it (its backing file named relative to the snapshot directory)."""
    from pyvirt.backends.qcow2_tools import create_qcow2
    copy = d / copy_name(i)
    try:
        copy_sparse(path, copy)
        if fmt == "qcow2":
            _absolute_backing(copy, path.parent)
    except OSError as e:
        raise ConfigError(f"snapshot: cannot copy disk {path} into {d}: {e.strerror or e}") from None
    copy.chmod(0o444)
    mine = d / overlay_name(i)
    create_qcow2(mine, None, backing=os.path.relpath(copy), backing_format=fmt)
    mine.chmod(0o444)
    return {"kind": "frozen", "path": str(copy.resolve()), "format": fmt, "size": size,
            "copied_from": str(path)}


_FICLONE = 0x40049409


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy the file `src` to the new file `dst`: a reflink where the file system shares
    blocks, else its data extents (holes stay holes)."""
    import fcntl
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(sfd).st_size
            try:
                fcntl.ioctl(dfd, _FICLONE, sfd)
                return
            except OSError:
                pass
            for start, end in _data_extents(sfd, size):
                off = start
                while off < end:
                    n = min(end - off, 8 << 20)
                    try:
                        done = os.copy_file_range(sfd, dfd, n, off, off)
                    except OSError:
                        done = os.pwrite(dfd, os.pread(sfd, n, off), off)
                    if done <= 0:
                        raise OSError(f"{src} ended early")
                    off += done
            os.ftruncate(dfd, size)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:                   # ENXIO: only a hole is left (or no SEEK_DATA)
            if off == 0 and not hasattr(os, "SEEK_DATA"):
                return [(0, size)]
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, min(end, size)))
        off = end
    return out


def data_digest(path: Path) -> str:
    """sha256 over the non-zero 64 KiB blocks of `path` and their offsets: the same for
    the same contents, however sparse; holes are not read."""
    h = hashlib.sha256()
    zero = bytes(1 << 16)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        for start, end in _data_extents(fd, size):
            off = start & ~0xFFFF
            while off < end:
                chunk = os.pread(fd, min(8 << 20, end - off), off)
                if not chunk:
                    break
                for k in range(0, len(chunk), 1 << 16):
                    block = chunk[k:k + (1 << 16)]
                    if block != zero[:len(block)]:
                        h.update((off + k).to_bytes(8, "little"))
                        h.update(block)
                off += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _digest_or_none(path: Path) -> str | None:
    try:
        return data_digest(path)
    except OSError:
        return None


def _absolute_backing(image: Path, base: Path) -> None:
    """Make the copied qcow2 `image`'s relative backing file name absolute (relative
    to `base`, the original's directory), in place in its first cluster."""
    import struct
    with open(image, "r+b") as f:
        head = f.read(24)
        off, n = struct.unpack_from(">QI", head, 8)
        cluster = 1 << struct.unpack_from(">I", head, 20)[0]
        if not n:
            return
        f.seek(off)
        name = f.read(n).decode("utf-8", "replace")
        if name.startswith("/"):
            return
        new = os.path.normpath(os.path.join(base, name)).encode()
        tail = f.read(max(0, len(new) - n))
        if off + len(new) > cluster or tail.strip(b"\0"):
            raise OSError(f"no room for the backing file name {new.decode()!r} in the copy")
        f.seek(off)
        f.write(new)
        f.seek(16)
        f.write(struct.pack(">I", len(new)))


def _file_entry(path: Path, digest: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"size": path.stat().st_size}
    if digest:
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entry


def _write_state(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(state, default=encode_bytes, separators=(",", ":")).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_ram(path: Path, ram: mmap.mmap, size: int) -> dict[str, Any]:
    """Only non-zero pages are written (runs of them with one pwrite); the rest are holes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    try:
        os.ftruncate(fd, ram_file_size(size))
        mv = memoryview(ram)
        for base in range(0, size, _CHUNK):
            end = min(base + _CHUNK, size)
            chunk = ram[base:end]
            if chunk == _ZERO_CHUNK[:end - base]:
                continue
            run = -1
            for off in range(0, end - base, PAGE_SIZE):
                zero = chunk[off:off + PAGE_SIZE] == _ZERO_PAGE
                if zero and run >= 0:
                    os.pwrite(fd, mv[base + run:base + off], base + run)
                    run = -1
                elif not zero and run < 0:
                    run = off
            if run >= 0:
                os.pwrite(fd, mv[base + run:end], base + run)
        mv.release()
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": ram_file_size(size)}


# -- restoring ----------------------------------------------------------------------------
def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest, checked: format, version, the files it lists (sizes, digests)."""
    d = Path(directory)
    path = d / MANIFEST
    try:
        raw = read_regular(path, MAX_MANIFEST)
    except FileTooLarge:
        raise ConfigError(f"snapshot {d}: {MANIFEST} is larger than {MAX_MANIFEST} bytes") from None
    except OSError as e:
        raise ConfigError(f"snapshot {d}: cannot read {MANIFEST}: {e.strerror or e}") from None
    m = _parse_json(raw, f"snapshot {d}: {MANIFEST}")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ConfigError(f"snapshot {d}: not a pyvirt snapshot (format is not {FORMAT!r})")
    version = m.get("version")
    if version != VERSION:
        raise ConfigError(f"snapshot {d}: format version {version!r} is not supported "
                          f"(this pyvirt {__version__} reads version {VERSION})")
    files, memory, disks = m.get("files"), m.get("memory"), m.get("disks")
    if not isinstance(files, dict) or type(memory) is not int or not isinstance(disks, list):
        raise ConfigError(f"snapshot {d}: {MANIFEST} lacks files, memory or disks")
    for name in (STATE, RAM):
        if name not in files:
            raise ConfigError(f"snapshot {d}: {MANIFEST} does not list {name}")
    if not isinstance(files[STATE], dict) or not isinstance(files[STATE].get("sha256"), str):
        raise ConfigError(f"snapshot {d}: {MANIFEST} gives no sha256 for {STATE}")
    for name, entry in files.items():
        _check_file(d, name, entry)
    return m


def _parse_json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:     # (ValueError: also over-long integers)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{what} is not valid JSON: {msg}") from None


def _check_file(d: Path, name: Any, entry: Any) -> None:
    if (not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(entry, dict)
            or type(entry.get("size")) is not int):
        raise ConfigError(f"snapshot {d}: bad file entry {str(name)[:60]!r} in {MANIFEST}")
    path = d / name
    try:
        st = path.lstat()
    except OSError:
        raise ConfigError(f"snapshot {d}: {name} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"snapshot {d}: {name} is not a regular file")
    if st.st_size != entry["size"]:
        raise ConfigError(f"snapshot {d}: {name} is {st.st_size} bytes, the manifest says {entry['size']}")
    if "data_sha256" in entry and data_digest(path) != entry["data_sha256"]:
        raise ConfigError(f"snapshot {d}: {name} changed since the snapshot (its contents do not "
                          "match the manifest's checksum)")
    digest = entry.get("sha256")
    if digest is not None:
        if entry["size"] > MAX_STATE:
            raise ConfigError(f"snapshot {d}: {name} is larger than {MAX_STATE} bytes")
        if hashlib.sha256(read_small(d, name)).hexdigest() != digest:
            raise ConfigError(f"snapshot {d}: {name} does not match its sha256 in the manifest")


def read_small(d: Path, name: str) -> bytes:
    """Snapshot file `name` of at most MAX_STATE bytes: a regular file, not through a symlink."""
    try:
        return read_regular(d / name, MAX_STATE, follow=False)
    except FileTooLarge:
        raise ConfigError(f"snapshot {d}: {name} is larger than {MAX_STATE} bytes") from None
    except OSError as e:
        raise ConfigError(f"snapshot {d}: cannot read {name}: {e.strerror or e}") from None


def _map_ram(path: Path, size: int) -> mmap.mmap:
    """The RAM file, private and writable: the guest's writes are copies, never the file's."""
    fd = _open_ram(path, size)
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _open_ram(path: Path, size: int) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"snapshot: cannot open {path}: {e.strerror}") from None
    if os.fstat(fd).st_size != size:
        os.close(fd)
        raise ConfigError(f"snapshot: {path} is not {size} bytes")
    return fd


def map_ram(path: Path, spec: VmSpec) -> tuple[mmap.mmap, int | None]:
    """Guest RAM for a VM restored from the RAM file `path`, and its memfd (or None).

    Usually the file mapped copy-on-write (`_map_ram`: restore time does not grow with RAM,
    clones share clean pages).  A VM with a shared folder needs RAM that virtiofsd can map
    too (a memfd, `memory.shared_ram`): the file's data is read into one, skipping its
    holes, so such a restore costs a read of the RAM the guest had touched and each such
    VM has its own copy."""
    size = ram_file_size(spec.memory)
    if not spec.shares:
        return _map_ram(path, size), None
    fd = _open_ram(path, size)
    ram, ram_fd = shared_ram(spec.memory)
    try:
        view = memoryview(ram)
        try:
            pos, end = 0, min(size, len(ram))
            while pos < end:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:          # ENXIO: only a hole remains
                    break
                stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
                while start < stop:
                    n = os.preadv(fd, [view[start:min(stop, start + (8 << 20))]], start)
                    if n <= 0:
                        raise ConfigError(f"snapshot: {path} ended early")
                    start += n
                pos = stop
        finally:
            view.release()
    except OSError as e:
        ram.close()
        os.close(ram_fd)
        raise ConfigError(f"snapshot: cannot read {path}: {e.strerror}") from None
    except BaseException:
        ram.close()
        os.close(ram_fd)
        raise
    finally:
        os.close(fd)
    return ram, ram_fd


def restored_spec(d: Path, m: dict[str, Any], spec: VmSpec, ov: Overrides, where: Path) -> VmSpec:
    """The spec a VM restored from the snapshot at `d` (manifest `m`, saved spec `spec`) runs
    with: each frozen disk on its own overlay in `where` (made by `make_overlays`), the
    overrides' NICs, MACs, port sockets and engine.  Computed once, where the restore is
    decided (the daemon's record, or `load_snapshot`); nothing is written here."""
    nets = list(spec.nets)
    if ov.nets is not None:
        if len(ov.nets) != len(nets):
            raise ConfigError(f"the snapshot has {len(nets)} network interfaces, "
                              f"the overrides give {len(ov.nets)}")
        nets = list(ov.nets)
    if ov.macs is not None:
        if len(ov.macs) != len(nets):
            raise ConfigError(f"the snapshot has {len(nets)} network interfaces, "
                              f"the overrides give {len(ov.macs)} MAC addresses")
        try:
            nets = [NetSpec.model_validate(dict(n.model_dump(), mac=mac)) for n, mac in zip(nets, ov.macs)]
        except ValidationError as e:
            raise ConfigError(f"MAC override: {e.errors()[0]['msg'].removeprefix('Value error, ')}") \
                from None
    ports = list(spec.ports)
    if ov.ports is not None:
        unknown = sorted(set(ov.ports) - {p.name for p in ports})
        if unknown:
            raise ConfigError(f"port override: the snapshot has no port named {unknown[0]!r}")
        ports = [PortSpec(name=p.name, socket=Path(ov.ports.get(p.name, p.socket))) for p in ports]
    disks = []
    for i, (saved, disk) in enumerate(zip(m["disks"], spec.disks)):
        kind = saved.get("kind") if isinstance(saved, dict) else None
        if kind == "shared" and disk.read_only:
            disks.append(disk)
        elif kind == "frozen" and not disk.read_only and overlay_name(i) in m["files"]:
            disks.append(disk.model_copy(update={"path": where / overlay_name(i), "format": "qcow2"}))
        else:
            raise ConfigError(f"snapshot {d}: disk {i} is recorded inconsistently")
    update: dict[str, Any] = {"disks": disks, "nets": nets, "ports": ports}
    if ov.engine is not None:
        update["engine"] = ov.engine
    if ov.vsock is not None and spec.vsock is not None:
        update["vsock"] = spec.vsock.model_copy(update={"socket": Path(ov.vsock)})
    try:
        return VmSpec.model_validate(dict(spec.model_dump(), **update))
    except ValidationError as e:
        raise ConfigError(f"restore overrides: {e.errors()[0]['msg']}") from None


def check_restored(d: Path, saved: VmSpec, spec: VmSpec) -> None:
    """`spec` (computed by `restored_spec`, e.g. by the daemon) is `saved`'s machine: only the
    disks' paths and formats, the NICs, the port and vsock sockets and the engine may differ."""
    def machine(s: VmSpec) -> dict[str, Any]:
        out = s.model_dump(mode="json", exclude={"nets", "ports", "engine", "vsock"})
        out["vsock"] = None if s.vsock is None else s.vsock.cid
        out["disks"] = [{k: v for k, v in disk.items() if k not in ("path", "format")} for disk in out["disks"]]
        out["nets"] = len(s.nets)
        out["ports"] = [p.name for p in s.ports]
        return out
    if machine(saved) != machine(spec):
        raise ConfigError(f"snapshot {d}: the restored spec is not the snapshot's machine")


def make_overlays(d: Path, m: dict[str, Any], spec: VmSpec, *, fresh: bool) -> None:
    """Each frozen disk's overlay at the path `spec` (a `restored_spec`) names, over the
    snapshot's overlay, after checking the frozen image is the one the snapshot saw.  With
    `fresh`, an overlay that exists already is an error (it holds an earlier restore's writes)."""
    from pyvirt.backends.qcow2_tools import create_qcow2
    for i, (saved, disk) in enumerate(zip(m["disks"], spec.disks)):
        if not isinstance(saved, dict) or saved.get("kind") != "frozen":
            continue
        base = saved.get("data_sha256")
        if base is not None and _digest_or_none(Path(str(saved.get("path", "")))) != base:
            raise ConfigError(f"snapshot {d}: disk {i}'s frozen image {saved.get('path')} changed "
                              "since the snapshot (its contents do not match the manifest's checksum)")
        overlay = Path(disk.path)
        if fresh and overlay.exists():
            raise ConfigError(f"{overlay} exists already (the disk writes of an earlier restore "
                              "are kept there): give --overlay-dir a new directory")
        overlay.parent.mkdir(parents=True, exist_ok=True)
        create_qcow2(overlay, None, backing=d / overlay_name(i), backing_format="qcow2")


def _restored_spec(d: Path, m: dict[str, Any], spec: VmSpec, ov: Overrides) -> tuple[VmSpec, Any]:
    """`restored_spec` with its overlays made: in `ov.overlay_dir`, else in a temporary
    directory that the returned cleanup removes."""
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if ov.overlay_dir is None and any(disk.get("kind") == "frozen" for disk in m["disks"]
                                      if isinstance(disk, dict)):
        tmp = tempfile.TemporaryDirectory(prefix="pyvirt-restore-")

    def cleanup() -> None:
        if tmp is not None:
            tmp.cleanup()

    try:
        new = restored_spec(d, m, spec, ov, Path(tmp.name) if tmp is not None else Path(ov.overlay_dir or "."))
        make_overlays(d, m, new, fresh=tmp is None)
    except BaseException:
        cleanup()
        raise
    return new, cleanup


