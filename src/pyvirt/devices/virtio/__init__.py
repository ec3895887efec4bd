"""virtio devices (virtio 1.2) and the MMIO transport."""
