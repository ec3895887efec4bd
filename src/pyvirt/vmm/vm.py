"""One running VM: the run loop and its I/O event loop.

The main thread runs the harts round-robin in slices of SLICE instructions.
Between slices it brings timer interrupts up to date and polls the I/O event
loop without blocking.  When every hart waits for an interrupt (WFI) it
blocks in the selector until the next timer deadline or host input, so an
idle guest costs no host CPU.

Host hook (for a VMM that serves requests while the VM runs, such as
pyvirtd's runner): `Vm.watches` holds `Watch`es, host descriptors the loop
also waits on, and whose callbacks it calls between slices when they are
readable; `Vm.pause()` makes the loop stop the harts at the next slice
boundary and block in select() on those descriptors only (no CPU use), with
the VM clock stopped, until `Vm.resume()` or `request_quit()` -- both are
meant to be called from a watch callback.  A snapshot requested while paused
(`request_snapshot` from a callback) is taken at once, the VM staying paused.
"""

from __future__ import annotations

import gc
import select
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvirt.backends.char import CharBackend
from pyvirt.errors import PyvirtError
from pyvirt.machine.interface import Halt, Machine, Reset, Wfi
from pyvirt.machine.riscv_virt import VirtBoard
from pyvirt.spec import VmSpec
from pyvirt.vmm.resources import build_board

SLICE = 20_000
MAX_IDLE_WAIT = 0.5
# Translation makes many long-lived objects (blocks, closures, tuples); CPython's
# default collector thresholds rescan them all a dozen times during a boot,
# which cost about a quarter of the boot's time.  While a VM runs, young
# objects are collected less often and full collections are rare.
GC_THRESHOLDS = (50_000, 50, 1000)


@dataclass
class SnapshotRequest:
    directory: Path
    then: str
    done: Callable[[dict[str, Any] | None, Exception | None], None] | None
    live_dir: Path | None = None
    own_dir: Path | None = None
    shares_unmounted: bool = False


@dataclass
class RunStats:
    instructions: int = 0
    wall: float = 0.0
    resets: int = 0

    @property
    def mips(self) -> float:
        return self.instructions / self.wall / 1e6 if self.wall else 0.0


@dataclass
class Watch:
    """Host descriptors the run loop also watches: `fds()` lists them (it is asked again each
    time, so the set may change), `on_ready(ready)` runs between slices with those readable;
    `on_tick()`, if given, runs between every two slices (and at least every MAX_IDLE_WAIT
    seconds while the guest idles) whatever is ready."""

    fds: Callable[[], list[int]]
    on_ready: Callable[[list[int]], None]
    on_tick: Callable[[], None] | None = None


class Vm:
    def __init__(self, spec: VmSpec, console: CharBackend, board: VirtBoard | None = None) -> None:
        """`board`: an already built machine (a restored snapshot) instead of a fresh boot."""
        self.spec = spec
        self.console = console
        self.quit_requested = False
        self.stats = RunStats()
        self.board = build_board(spec, console) if board is None else board
        self.on_close: list[Callable[[], None]] = []       # run after the board is closed
        self._snapshots: list[SnapshotRequest] = []
        self.watches: list[Watch] = []
        self.paused = False
        self.snapshots_taken = 0
        # True: a guest reboot resets the board in place (`VirtBoard.reset`: devices and
        # harts reset, the guest loaded again; host backends kept), also in a jailed runner.
        # False: it ends run() (returns None, `reboot_requested` set) for the caller to
        # start the VM again.
        self.reset_in_place = True
        self.reboot_requested = False

    def request_quit(self) -> None:
        self.quit_requested = True

    def pause(self) -> None:
        """Stop the harts at the next slice boundary (the VM clock stops with them)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    # -- the host hook ---------------------------------------------------------------------
    def _watch_fds(self) -> list[int]:
        return [fd for w in self.watches for fd in w.fds()]

    def _service_watches(self, timeout: float | None) -> None:
        """Wait up to `timeout` (None: for ever) for a watched descriptor; run the callbacks
        of the ready ones."""
        for w in self.watches:
            if w.on_tick is not None:
                w.on_tick()
        fds = self._watch_fds()
        if not fds:                      # only another thread can resume: look again now and then
            if timeout != 0.0:           # (between slices: no system call for nothing)
                time.sleep(MAX_IDLE_WAIT if timeout is None else timeout)
            return
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if not ready:
            return
        for w in list(self.watches):
            mine = [fd for fd in w.fds() if fd in ready]
            if mine:
                w.on_ready(mine)

    def _paused_wait(self, board: Machine) -> None:
        """The paused state: only the watches run, in select(); the guest sees no time pass."""
        self.console.flush()
        board.clock.pause()
        try:
            while self.paused and not self.quit_requested:
                self._service_watches(None)
                if self._snapshots:           # a snapshot of the paused VM: the harts are
                    self._serve_snapshots()   # stopped at a slice boundary already
        finally:
            board.clock.resume()

    def close(self) -> None:
        """Release the board's backends: disk images are written back (a qcow2 image's
        metadata waits in memory for the guest's FLUSH or this) and unlocked; console
        port sockets are closed and removed."""
        try:
            self.board.close()
        finally:
            while self.on_close:
                self.on_close.pop()()

    # -- snapshots (vmm/snapshot.py) ------------------------------------------------------
    def request_snapshot(self, directory: str | Path, then: str = "continue",
                         done: Callable[[dict[str, Any] | None, Exception | None], None] | None = None,
                         live_dir: str | Path | None = None, own_dir: str | Path | None = None,
                         shares_unmounted: bool = False) -> None:
        """Take a snapshot at the next slice boundary inside `run`; then go on running
        (`then="continue"`) or end the run (`"quit"`).  `done(manifest, error)` is called
        after it was written (or failed: the VM goes on either way, unless "quit").
        `live_dir`: where the running VM's new disk overlays go; `own_dir`: where pyvirt's
        own disk images are (frozen in place; the user's disks are copied: see save_snapshot);
        `shares_unmounted`: the caller unmounted the shared folders in the guest (see there)."""
        if then not in ("continue", "quit"):
            raise ValueError(f"then must be 'continue' or 'quit', not {then!r}")
        self._snapshots.append(SnapshotRequest(Path(directory), then, done,
                                               Path(live_dir) if live_dir else None,
                                               Path(own_dir) if own_dir else None, shares_unmounted))

    def _serve_snapshots(self) -> None:
        from pyvirt.vmm.snapshot import save_snapshot
        while self._snapshots:
            req = self._snapshots.pop(0)
            manifest, error = None, None
            try:
                manifest = save_snapshot(self, req.directory, then=req.then, live_dir=req.live_dir,
                                         own_dir=req.own_dir, shares_unmounted=req.shares_unmounted)
                self.snapshots_taken += 1
            except (PyvirtError, OSError) as e:
                error = e
            if req.then == "quit":
                self.quit_requested = True
            if req.done is not None:
                req.done(manifest, error)
            elif error is not None:
                raise error

    def run(self, max_instructions: int | None = None, timeout: float | None = None,
            restore_gc: bool = True) -> int | None:
        """Run until power-off (returns the exit status), quit, or a limit (returns None).

        `restore_gc=False` leaves the collector as the run set it (objects frozen,
        rare collections): for a process that ends with the VM."""
        sel = selectors.DefaultSelector()
        fd = self.console.fileno()
        if fd is not None:
            try:
                sel.register(fd, selectors.EVENT_READ)
            except (OSError, ValueError):      # e.g. /dev/null or a regular file
                pass
        start = time.monotonic()
        deadline = start + timeout if timeout else None
        self.board.clock.resume()          # (a migrated VM's waits for its first slice)
        tune_gc = hasattr(gc, "freeze")    # CPython's collector (PyPy's is generational anyway)
        if tune_gc:
            saved_gc = gc.get_threshold()
            gc.freeze()                     # what exists now lives as long as the VM
            gc.set_threshold(*GC_THRESHOLDS)
        try:
            while True:
                board = self.board
                code = self._run_board(board, sel, max_instructions, deadline)
                if board.reset_requested and not self.quit_requested:
                    if not self.reset_in_place:
                        self.reboot_requested = True
                        return None
                    self.stats.resets += 1
                    board.reset()
                    continue
                return code
        finally:
            self.stats.wall = time.monotonic() - start
            if restore_gc and tune_gc:
                gc.set_threshold(*saved_gc)
                gc.unfreeze()
            sel.close()
            self.console.flush()

    def _run_board(self, board: Machine, sel: selectors.BaseSelector,
                   max_instructions: int | None, deadline: float | None) -> int | None:
        console, stats = self.console, self.stats
        while True:
            ended = board.run_slice(SLICE)
            stats.instructions += ended.instructions
            board.poll()
            if self._snapshots:
                self._serve_snapshots()
            if isinstance(ended, (Halt, Reset)) or self.quit_requested:
                return board.exit_code
            if max_instructions is not None and stats.instructions >= max_instructions:
                return None
            wait = 0.0
            # An interrupt the poll just raised (a frame from the network, console input) wakes
            # an idle hart now, not after the next timer deadline.
            if isinstance(ended, Wfi) and not board.interrupt_pending():
                nxt = board.next_deadline()
                wait = MAX_IDLE_WAIT if nxt is None else min(MAX_IDLE_WAIT, board.clock.seconds_until(nxt))
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
            if sel.get_map() and console.fileno() is None:
                for key in list(sel.get_map().values()):     # input ended: stop watching it
                    sel.unregister(key.fileobj)
            if wait > 0:
                extra = board.wait_fds() + self._watch_fds()
                if extra:
                    fds = [k.fd for k in sel.get_map().values()] + extra
                    select.select(fds, [], [], wait)
                elif sel.get_map():
                    sel.select(wait)
                else:
                    time.sleep(wait)
            console.poll()
            if self.watches:
                self._service_watches(0.0)
            if self.paused:
                self._paused_wait(board)
            if self.quit_requested:          # (from a callback: no further slice runs)
                return board.exit_code
            if deadline is not None and time.monotonic() >= deadline:
                return None
