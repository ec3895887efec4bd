"""pyvirtd's database (SQLite, <state>/pyvirtd.db): one row per VM.

    vms(id TEXT PRIMARY KEY,       -- 12 hex digits, names the VM's directory and cgroup
        name TEXT UNIQUE NOT NULL, -- what users call it
        spec TEXT NOT NULL,        -- the VmSpec as JSON (kernel, initrd, append resolved)
        limits TEXT NOT NULL,      -- {"cpu_quota": CPUs or null, "memory_limit": bytes}
        desired TEXT NOT NULL,     -- running | stopped: what the user last asked for
        created REAL NOT NULL,     -- Unix time
        state TEXT NOT NULL,       -- stopped | running | paused | crashed
        pid INTEGER,               -- the runner, while it runs
        pid_start INTEGER,         -- its start time (/proc/PID/stat field 22): PID reuse check
        control TEXT,              -- its control socket
        started REAL,              -- when it was started (Unix time)
        exit_status INTEGER,       -- the guest's exit status when it powered off
        reason TEXT,               -- how it ended (poweroff, killed, a crash's cause)
        cgroup TEXT,               -- the runner's cgroup placement (JSON), while it runs
        origin TEXT)               -- the snapshot it was restored or cloned from (its disks
                                   -- and first RAM image are that snapshot's files)

    snapshots(name TEXT PRIMARY KEY, -- what users call it; <state>/snapshots/<name>/
        vm TEXT NOT NULL,          -- the VM it was taken of (its name then)
        vm_id TEXT NOT NULL,
        dir TEXT NOT NULL,         -- the snapshot directory (vmm/snapshot.py's format)
        created REAL NOT NULL,     -- Unix time
        memory INTEGER NOT NULL,   -- guest RAM bytes
        size INTEGER NOT NULL,     -- bytes it takes on disk (allocated blocks)
        version INTEGER NOT NULL,  -- the snapshot format version
        frozen TEXT NOT NULL)      -- JSON list: the frozen disk images its overlays back onto

Every access goes through one connection guarded by a lock (the API serves
requests on several threads, the monitor runs on another).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    spec TEXT NOT NULL,
    limits TEXT NOT NULL,
    desired TEXT NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER,
    pid_start INTEGER,
    control TEXT,
    started REAL,
    exit_status INTEGER,
    reason TEXT,
    cgroup TEXT,
    origin TEXT
);
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    dir TEXT NOT NULL,
    created REAL NOT NULL,
    memory INTEGER NOT NULL,
    size INTEGER NOT NULL,
    version INTEGER NOT NULL,
    frozen TEXT NOT NULL
);
"""
STATES = ("stopped", "running", "paused", "crashed", "migrated")      # migrated: moved to another pyvirtd


class DuplicateName(Exception):
    pass


@dataclass
class VmRecord:
    id: str
    name: str
    spec: str
    limits: str
    desired: str
    created: float
    state: str = "stopped"
    pid: int | None = None
    pid_start: int | None = None
    control: str | None = None
    started: float | None = None
    exit_status: int | None = None
    reason: str | None = None
    cgroup: str | None = None
    origin: str | None = None

    @property
    def spec_dict(self) -> dict[str, Any]:
        return json.loads(self.spec)

    @property
    def limits_dict(self) -> dict[str, Any]:
        return json.loads(self.limits)

    @property
    def alive(self) -> bool:
        """The runner is (believed to be) running: running or paused."""
        return self.state in ("running", "paused")


_COLUMNS = [f.name for f in fields(VmRecord)]


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(vms)")}
        if "origin" not in have:                 # a database from before snapshots
            self.db.execute("ALTER TABLE vms ADD COLUMN origin TEXT")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def add(self, rec: VmRecord) -> None:
        row = asdict(rec)
        with self.lock:
            try:
                self.db.execute(f"INSERT INTO vms ({', '.join(_COLUMNS)}) VALUES "
                                f"({', '.join('?' * len(_COLUMNS))})", [row[c] for c in _COLUMNS])
            except sqlite3.IntegrityError as e:
                if "name" in str(e):
                    raise DuplicateName(rec.name) from None
                raise

    def get(self, key: str) -> VmRecord | None:
        """A VM by name, else by id."""
        with self.lock:
            row = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM vms WHERE name = ?", (key,)).fetchone() \
                or self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM vms WHERE id = ?", (key,)).fetchone()
        return VmRecord(*row) if row else None

    def all(self) -> list[VmRecord]:
        with self.lock:
            rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM vms ORDER BY created, name").fetchall()
        return [VmRecord(*r) for r in rows]

    def update(self, vm_id: str, **changes: Any) -> None:
        bad = set(changes) - set(_COLUMNS) - {"id"} or set(changes) & {"id"}
        if bad:
            raise KeyError(f"no such column: {sorted(bad)}")
        if "state" in changes and changes["state"] not in STATES:
            raise ValueError(f"invalid state {changes['state']!r}")
        with self.lock:
            self.db.execute(f"UPDATE vms SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?",
                            [*changes.values(), vm_id])

    def delete(self, vm_id: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))


@dataclass
class SnapshotRecord:
    name: str
    vm: str
    vm_id: str
    dir: str
    created: float
    memory: int
    size: int
    version: int
    frozen: str

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "frozen": json.loads(self.frozen)}


_SNAP_COLUMNS = [f.name for f in fields(SnapshotRecord)]


class SnapshotStore:
    """The snapshots table (on the VM store's connection and lock)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, rec: SnapshotRecord) -> None:
        row = asdict(rec)
        with self.store.lock:
            try:
                self.store.db.execute(f"INSERT INTO snapshots ({', '.join(_SNAP_COLUMNS)}) VALUES "
                                      f"({', '.join('?' * len(_SNAP_COLUMNS))})", [row[c] for c in _SNAP_COLUMNS])
            except sqlite3.IntegrityError:
                raise DuplicateName(rec.name) from None

    def get(self, name: str) -> SnapshotRecord | None:
        with self.store.lock:
            row = self.store.db.execute(f"SELECT {', '.join(_SNAP_COLUMNS)} FROM snapshots WHERE name = ?",
                                        (name,)).fetchone()
        return SnapshotRecord(*row) if row else None

    def all(self) -> list[SnapshotRecord]:
        with self.store.lock:
            rows = self.store.db.execute(f"SELECT {', '.join(_SNAP_COLUMNS)} FROM snapshots "
                                         "ORDER BY created, name").fetchall()
        return [SnapshotRecord(*r) for r in rows]

    def delete(self, name: str) -> None:
        with self.store.lock:
            self.store.db.execute("DELETE FROM snapshots WHERE name = ?", (name,))
