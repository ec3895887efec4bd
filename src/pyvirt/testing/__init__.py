"""Test doubles and harnesses shipped with pyvirt (usable by its users too).

* `pyvirt.testing.clock`  -- `MockClock`, the VM clock advanced by hand.
* `pyvirt.testing.fakes`  -- `MemoryBlockBackend`, `FakeCharBackend`.
* `pyvirt.testing.virtq`  -- `MockVirtioDriver`: drives a virtio-mmio device as
  Linux does and builds split virtqueues in guest RAM, and lets a test
  corrupt any of it.
* `pyvirt.testing.qemu_img` -- `qemu-img` and `qemu-io` as functions, to make,
  change and check disk images with QEMU's own code.
* `pyvirt.testing.virtio_rig` -- a bus with RAM and one virtio-mmio device
  mapped, driven by the mock driver (`make_rig`, `GuardedBus`).
* `pyvirt.testing.daemon` -- `Daemon`: a real pyvirtd process on a state
  directory; `wait_for`; the snapshot tests' guest counter (`COUNTER`, `counts`).
* `pyvirt.testing.archives` -- hand-made export archives (`write_archive`, `member`).
* `pyvirt.testing.guest` -- `pyvirt(...)` runs the CLI, `PtyConsole` runs
  `pyvirt run` on a pseudo-terminal.
* `pyvirt.testing.images` -- a signed local Debian archive, .deb packages and
  kernel modules made for the image builder's tests.

`stretch(seconds)` is a deadline for guest work, written for the native engine, made
longer for the engine a test run forces (`PYVIRT_ENGINE=jit make test`).
"""

from __future__ import annotations

from pyvirt.engines import default_engine

# How much longer guest work takes on each engine than on the native tier, which the suite's
# deadlines are written for: the lean guest's `pyvirt run --command true` took about 1.2 s
# native, 28 s jit and 44 s interp on these 2-core machines (2026-12-06).
SLOWER = {"native": 1.0, "jit": 25.0, "interp": 40.0}


def stretch(seconds: float) -> float:
    """`seconds`, a deadline for work a guest does, on the engine the tests run on."""
    return seconds * SLOWER[default_engine()]
