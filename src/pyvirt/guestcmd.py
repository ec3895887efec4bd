"""The default guest's command contract, shared by `pyvirt run --command` and pyvirtd: the
command travels base64-encoded on the kernel command line (pyvirt.cmd=...) to its /init."""

from __future__ import annotations

import base64

from pyvirt.errors import ConfigError

MAX_COMMAND_B64 = 900     # the riscv kernel command line holds 1024 bytes


def command_append(append: str | None, command: str, what: str = "--command") -> str:
    """The kernel command line `append` extended to run `command` (and print only its output)."""
    encoded = base64.b64encode(command.encode()).decode()
    if len(encoded) > MAX_COMMAND_B64:
        raise ConfigError(f"{what} is too long ({len(command.encode())} bytes; the kernel "
                          f"command line allows about {MAX_COMMAND_B64 * 3 // 4})")
    # Keep the console to the command's own output -- and a kernel panic's message
    # (KERN_EMERG, shown with loglevel=1), which `pyvirt run` reports (vmm/watchdog.py).
    parts = [a for a in (append or "").split() if not a.startswith("earlycon")]
    return " ".join(parts + ["quiet", "loglevel=1", f"pyvirt.cmd={encoded}"])
