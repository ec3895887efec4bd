"""VM snapshots: save a VM between CPU slices to a directory, restore it as new VMs.

A snapshot directory holds (ARCHITECTURE.md, "Snapshots", has the reasons)::

    manifest.json   format "pyvirt-snapshot", version, the VmSpec, RAM size, files
                    with sizes (and sha256 of the small ones); written last
    state.json      every device's, hart's and the clock's state as plain JSON
                    (bytes as base64); checked against a schema before loading
    ram             guest RAM plus one page, a sparse file: zero pages are holes
    diskN.qcow2     for each writable disk: an empty, read-only qcow2 overlay over
                    the disk's frozen image (the VM's top image at snapshot time)

Restoring maps `ram` copy-on-write (MAP_PRIVATE): nothing is read up front,
the file is never written, and VMs restored from one snapshot share its
unmodified pages through the page cache.  Each restored VM writes its disks
through fresh overlays of its own over the snapshot's `diskN.qcow2`.
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

from pyvirt import __version__
from pyvirt.backends.char import CharBackend
from pyvirt.backends.disk import open_disk
from pyvirt.errors import ConfigError, ImageError, PyvirtError
from pyvirt.memory import PAGE_SIZE
from pyvirt.spec import NetSpec, PortSpec, VmSpec
from pyvirt.vmm.snapcheck import check_state, encode_bytes

if TYPE_CHECKING:
    from pyvirt.vmm.vm import Vm

FORMAT = "pyvirt-snapshot"
VERSION = 1
MANIFEST, STATE, RAM = "manifest.json", "state.json", "ram"
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
    restored next to its original must not bind the original's sockets)."""

    nets: list[NetSpec] | None = None
    macs: list[str] | None = None
    overlay_dir: str | Path | None = None
    engine: str | None = None
    ports: dict[str, str | Path] | None = None


# -- saving -----------------------------------------------------------------------------
def save_snapshot(vm: Vm, directory: str | Path, *, then: str = "continue",
                  live_dir: str | Path | None = None) -> dict[str, Any]:
    """Write a snapshot of `vm` (between slices: the VM is not executing) to `directory`
    (new, or empty); returns the manifest.

    Writable disks are frozen: their image becomes read-only for good, the snapshot
    gets an overlay over it, and with `then="continue"` the VM goes on writing to a
    new overlay of its own in `live_dir` (default: `directory`/live), which
    `vm.spec` then names.  With `then="quit"` the VM must not run again."""
    if then not in ("continue", "quit"):
        raise ConfigError(f"snapshot: then must be 'continue' or 'quit', not {then!r}")
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
        disks = _freeze_disks(vm, d, then, Path(live_dir) if live_dir else d / "live")
        files = {STATE: _write_state(d / STATE, state),
                 RAM: _write_ram(d / RAM, board.bus.ram, board.bus.ram_size)}
        for i, disk in enumerate(disks):
            if disk["kind"] == "frozen":
                files[f"disk{i}.qcow2"] = _file_entry(d / f"disk{i}.qcow2", digest=True)
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


def _freeze_disks(vm: Vm, d: Path, then: str, live_dir: Path) -> list[dict[str, Any]]:
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
        backend.close()                   # written back and unlocked: from now on only read
        frozen.append(path)
        mine = d / f"disk{i}.qcow2"
        create_qcow2(mine, None, backing=path, backing_format=fmt)
        mine.chmod(0o444)
        out.append({"kind": "frozen", "path": str(path), "format": fmt, "size": backend.size})
        if then == "continue":
            live_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            live = (live_dir / f"disk{i}.qcow2").resolve()
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
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST + 1)
    except OSError as e:
        raise ConfigError(f"snapshot {d}: cannot read {MANIFEST}: {e.strerror or e}") from None
    if len(raw) > MAX_MANIFEST:
        raise ConfigError(f"snapshot {d}: {MANIFEST} is larger than {MAX_MANIFEST} bytes")
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
    digest = entry.get("sha256")
    if digest is not None:
        if entry["size"] > MAX_STATE:
            raise ConfigError(f"snapshot {d}: {name} is larger than {MAX_STATE} bytes")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ConfigError(f"snapshot {d}: {name} does not match its sha256 in the manifest")


def load_snapshot(directory: str | Path, console: CharBackend, *,
                  overrides: Overrides | None = None) -> Vm:
    """A new, not yet running Vm in the state the snapshot at `directory` saved.

    Every problem with the snapshot (or the host files it needs) is one ConfigError or
    ImageError line.  Host-side backends (network, console ports) are made afresh from
    the spec; the caller's `console` serves the UART."""
    from pyvirt.machine.riscv_virt import VirtBoard
    from pyvirt.vmm.vm import Vm

    d = Path(directory).resolve()
    m = read_manifest(d)
    try:
        spec = VmSpec.model_validate(m.get("spec"))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise ConfigError(f"snapshot {d}: invalid spec: {where}: {err['msg']}") from None
    if m["memory"] != spec.memory or m["files"][RAM]["size"] != ram_file_size(spec.memory):
        raise ConfigError(f"snapshot {d}: RAM size does not match the spec's {spec.memory} bytes")
    if len(m["disks"]) != len(spec.disks):
        raise ConfigError(f"snapshot {d}: {len(m['disks'])} disks recorded, the spec has {len(spec.disks)}")
    raw = (d / STATE).read_bytes()
    state = _parse_json(raw, f"snapshot {d}: {STATE}")
    spec, cleanup = _restored_spec(d, m, spec, overrides or Overrides())
    ram = _map_ram(d / RAM, ram_file_size(spec.memory))
    board = None
    try:
        board = VirtBoard(spec, console, ram=ram, restore=True)
        checked = check_state(board, state)
        try:
            board.load_state(checked)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ConfigError(f"snapshot {d}: state does not fit the machine: {e}") from None
        vm = Vm(spec, console, board=board)
    except BaseException as e:
        if board is not None:
            board.close()
        cleanup()
        if isinstance(e, PyvirtError) and not isinstance(e, (ConfigError, ImageError)):
            raise ConfigError(str(e)) from None
        raise
    vm.on_close.append(cleanup)
    return vm


def _map_ram(path: Path, size: int) -> mmap.mmap:
    """The RAM file, private and writable: the guest's writes are copies, never the file's."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"snapshot: cannot open {path}: {e.strerror}") from None
    try:
        if os.fstat(fd).st_size != size:
            raise ConfigError(f"snapshot: {path} is not {size} bytes")
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _restored_spec(d: Path, m: dict[str, Any], spec: VmSpec, ov: Overrides) -> tuple[VmSpec, Any]:
    """The spec a restored VM runs with: its own disk overlays, overridden NICs."""
    from pyvirt.backends.qcow2_tools import create_qcow2
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
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if any(disk.get("kind") == "frozen" for disk in m["disks"] if isinstance(disk, dict)):
        if ov.overlay_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="pyvirt-restore-")
            where = Path(tmp.name)
        else:
            where = Path(ov.overlay_dir)
            where.mkdir(parents=True, exist_ok=True)

    def cleanup() -> None:
        if tmp is not None:
            tmp.cleanup()

    disks = []
    try:
        for i, (saved, disk) in enumerate(zip(m["disks"], spec.disks)):
            kind = saved.get("kind") if isinstance(saved, dict) else None
            if kind == "shared" and disk.read_only:
                disks.append(disk)
            elif kind == "frozen" and not disk.read_only and f"disk{i}.qcow2" in m["files"]:
                overlay = where / f"disk{i}.qcow2"
                create_qcow2(overlay, None, backing=d / f"disk{i}.qcow2", backing_format="qcow2")
                disks.append(disk.model_copy(update={"path": overlay, "format": "qcow2"}))
            else:
                raise ConfigError(f"snapshot {d}: disk {i} is recorded inconsistently")
    except BaseException:
        cleanup()
        raise
    update: dict[str, Any] = {"disks": disks, "nets": nets, "ports": ports}
    if ov.engine is not None:
        update["engine"] = ov.engine
    try:
        new = VmSpec.model_validate(dict(spec.model_dump(), **update))
    except ValidationError as e:
        cleanup()
        raise ConfigError(f"restore overrides: {e.errors()[0]['msg']}") from None
    return new, cleanup


