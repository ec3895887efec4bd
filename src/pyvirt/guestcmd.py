"""The default guest's contract with the host, shared by `pyvirt run --command` and pyvirtd:
the command travels base64-encoded on the kernel command line (pyvirt.cmd=...) to its /init,
and the guest agent answers on the virtio-console port named AGENT_PORT (images/data/init)."""

from __future__ import annotations

import base64

from pyvirt.errors import ConfigError

MAX_COMMAND_B64 = 900     # the riscv kernel command line holds 1024 bytes
AGENT_PORT = "org.pyvirt.agent"   # the port pyvirtd's runner adds to every VM for the guest agent


def command_append(append: str | None, command: str, what: str = "--command") -> str:
    """The kernel command line `append` extended to run `command` (and print only its output)."""
    encoded = base64.b64encode(command.encode()).decode()
    if len(encoded) > MAX_COMMAND_B64:
        raise ConfigError(f"{what} is too long ({len(command.encode())} bytes; the kernel "
                          f"command line allows about {MAX_COMMAND_B64 * 3 // 4})")
    # Keep the console to the command's own output.
    parts = [a for a in (append or "").split() if not a.startswith("earlycon")]
    return " ".join(parts + ["quiet", "loglevel=0", f"pyvirt.cmd={encoded}"])
