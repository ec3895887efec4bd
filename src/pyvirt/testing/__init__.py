"""Test doubles and harnesses shipped with pyvirt (usable by its users too).

* `pyvirt.testing.clock`  -- `MockClock`, the VM clock advanced by hand.
* `pyvirt.testing.fakes`  -- `MemoryBlockBackend`, `FakeCharBackend`.
* `pyvirt.testing.virtq`  -- `MockVirtioDriver`: drives a virtio-mmio device as
  Linux does and builds split virtqueues in guest RAM, and lets a test
  corrupt any of it.
* `pyvirt.testing.qemu_img` -- `qemu-img` and `qemu-io` as functions, to make,
  change and check disk images with QEMU's own code.
"""
