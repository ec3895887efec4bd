"""The names of a snapshot directory's files, spelled only here: vmm (saving, restoring),
host (the daemon's snapshot records, export) and the archive code use these.  A module of
its own with no imports, so that the daemon can name them without loading the VMM."""

MANIFEST, STATE, RAM = "manifest.json", "state.json", "ram"


def overlay_name(i: int) -> str:
    """Disk i's qcow2 overlay: in a snapshot, over the disk's frozen image; in a running VM's
    live directory and in a restored VM's overlay directory, over the snapshot's overlay."""
    return f"disk{i}.qcow2"


def image_name(i: int) -> str:
    """Disk i's whole image where a snapshot carries its disks (one imported from an archive)."""
    return f"disk{i}.raw"


def copy_name(i: int) -> str:
    """Disk i's copy in a snapshot of a VM on the user's own disk (the VM keeps writing the
    user's file; the snapshot's overlay is over this copy)."""
    return f"disk{i}.img"
