"""Host-side errors.

Errors caused by the *guest* are never Python exceptions that escape the VMM:
CPU faults are `pyvirt.cpu.riscv.traps.Trap` values delivered to the guest, and
device misuse completes a request with an error status.  The classes here are
for the *host* side and form this tree::

    PyvirtError                 anything pyvirt reports to its user as one line
    ├── ConfigError             bad flags, bad VM specification
    ├── ImageError              missing/corrupt kernel, initrd, disk image
    │   └── ImageCorruptError     a disk image's metadata found corrupt while in use;
    │                             also an OSError (EIO), so a device fails the request
    ├── BuildError              building a guest image failed
    └── GuestMemoryError        a guest-supplied physical range is not RAM
                                (caught by devices and turned into a device error)
"""

import errno


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters written as escapes (\\n,
    \\x1b): a message that quotes what a user, a file or a peer supplied stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class PyvirtError(Exception):
    """Base of all user-facing pyvirt errors; str(e) is a one-line message (whatever
    user-supplied text it quotes: see `one_line`)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class ConfigError(PyvirtError):
    """The user asked for something invalid."""


class ImageError(PyvirtError):
    """A kernel, initrd or disk image is missing or malformed."""


class ImageCorruptError(ImageError, OSError):
    """A disk image's metadata is inconsistent (found while reading or writing it).

    Being an OSError with errno EIO, it fails the guest's request like a disk
    error; being an ImageError, it is one line for the user.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return one_line(str(self.strerror))


class BuildError(PyvirtError):
    """Building a guest image failed."""


class GuestMemoryError(PyvirtError):
    """A guest-supplied guest-physical range lies outside guest RAM."""
