"""What `pyvirt run` watches so that a guest never hangs silently (issue 18).

* A kernel panic: the console's "Kernel panic - not syncing: ..." line (the
  `--command` kernel command line keeps KERN_EMERG messages, loglevel=1) ends
  the run soon after (the panic's trace has a moment to print) with that line
  as the reason.
* Firmware that never starts the kernel: with `--bios` and `--kernel`, no hart
  in S-mode after FIRMWARE_SECONDS or FIRMWARE_INSTRUCTIONS ends the run.
* A long boot: on a terminal, while the guest has printed nothing, a status
  line on stderr (seconds, instructions) every second, erased at the guest's
  first output.

`GuestWatch.attach(vm)` hooks it into a Vm (a console output tap and a Watch
whose on_tick runs between slices); after the run `failure` says why it was
ended, or is None.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvirt.vmm.vm import Vm

PANIC = b"Kernel panic - not syncing"
PANIC_GRACE = 1.0            # seconds the panic's trace has to print before the run ends
FIRMWARE_SECONDS = 30.0
FIRMWARE_INSTRUCTIONS = 300_000_000
PROGRESS_AFTER = 2.0         # seconds of a silent guest before the status line shows


class GuestWatch:
    def __init__(self, vm: Vm, *, progress: bool, firmware: bool) -> None:
        self.vm = vm
        self.failure: str | None = None
        self.progress = progress
        self.firmware = firmware          # --bios with a kernel to reach
        self.started = time.monotonic()
        self._tail = b""
        self._panic: bytes | None = None
        self._panic_at = 0.0
        self._quiet_guest = True
        self._shown = 0.0
        self._line = False

    def attach(self) -> None:
        from pyvirt.vmm.vm import Watch
        console = self.vm.console
        write = console.write

        def tapped(data: bytes) -> None:
            if self._line:
                self._clear()
            self._quiet_guest = False
            self._scan(data)
            write(data)

        console.write = tapped            # type: ignore[method-assign]
        self.vm.watches.append(Watch(lambda: [], lambda _ready: None, self.tick))

    def _scan(self, data: bytes) -> None:
        if self._panic is not None:
            if not self._panic.endswith(b"\n") and len(self._panic) < 400:
                self._panic += data[:400]
                self._panic = self._panic.split(b"\n")[0] + (b"\n" if b"\n" in self._panic else b"")
            return
        text = self._tail + data
        at = text.find(PANIC)
        if at < 0:
            self._tail = text[-len(PANIC):]
            return
        line = text[at:at + 400]
        self._panic = line.split(b"\n")[0] + (b"\n" if b"\n" in line else b"")
        self._panic_at = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if self._panic is not None and self.failure is None and now - self._panic_at >= PANIC_GRACE:
            line = self._panic.decode("utf-8", "replace").strip()
            self.failure = f"the guest kernel panicked: {line}"
            self.vm.request_quit()
        if self.firmware:
            if self.vm.board.kernel_started():
                self.firmware = False
            elif (now - self.started > FIRMWARE_SECONDS
                  or self.vm.stats.instructions > FIRMWARE_INSTRUCTIONS) and self.failure is None:
                self.failure = (f"the firmware {self.vm.spec.bios} did not start the kernel "
                                f"(no hart reached S-mode in {now - self.started:.0f} s)")
                self.vm.request_quit()
        if self.progress and self._quiet_guest and now - self._shown >= 1.0 \
                and now - self.started >= PROGRESS_AFTER:
            self._shown = now
            self._line = True
            self._write(f"\rpyvirt: booting, {now - self.started:.0f} s, "
                        f"{self.vm.stats.instructions / 1e6:,.0f}M instructions (nothing printed yet)\x1b[K")

    def _clear(self) -> None:
        self._line = False
        self._write("\r\x1b[K")

    def close(self) -> None:
        if self._line:
            self._clear()

    @staticmethod
    def _write(text: str) -> None:
        try:
            os.write(sys.stderr.fileno(), text.encode())
        except OSError:
            pass


def watch_run(vm: Vm, quiet: bool, firmware: bool) -> GuestWatch:
    """A GuestWatch attached to the `pyvirt run` VM `vm` (progress only on a terminal;
    `firmware`: a fresh boot, whose --bios must reach the kernel)."""
    w = GuestWatch(vm, progress=not quiet and sys.stderr.isatty(),
                   firmware=firmware and vm.spec.bios is not None and vm.spec.kernel is not None)
    w.attach()
    return w
