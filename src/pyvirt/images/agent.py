"""The guest agent binary: data/agent/pyvirt-agent.c built static for riscv64.

Built with the cross compiler (riscv64-linux-gnu-gcc, the cross libc installed by
scripts/setup-system.sh) and cached under a key of its source, the compiler flags and
AGENT_BUILD_VERSION; the default initramfs and the Debian image carry it.  The protocol
it speaks is docs/agent.md (the host side: host/agent.py).
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

from pyvirt.errors import BuildError
from pyvirt.images import cache

AGENT_BUILD_VERSION = "1"
CC = "riscv64-linux-gnu-gcc"
CFLAGS = ("-static", "-Os", "-Wall", "-Wno-format-truncation", "-s")


def agent_source() -> bytes:
    return resources.files("pyvirt.images").joinpath("data/agent/pyvirt-agent.c").read_bytes()


def agent_path() -> Path:
    """Where the agent built from the current source is cached."""
    key = cache.key("agent", AGENT_BUILD_VERSION, agent_source(), *CFLAGS)
    return cache.cache_root() / f"agent-{key}" / "pyvirt-agent"


def build_agent() -> Path:
    """The cached agent binary, compiled if missing (BuildError naming what failed)."""
    final = agent_path()
    if final.is_file():
        return final
    if shutil.which(CC) is None:
        raise BuildError(f"{CC} is needed to build the guest agent (scripts/setup-system.sh installs it)")
    with cache.lock(final.parent.name):
        if final.is_file():
            return final
        with cache.building(final.parent) as out:
            src = out / "pyvirt-agent.c"
            src.write_bytes(agent_source())
            try:
                p = subprocess.run([CC, *CFLAGS, "-o", str(out / "pyvirt-agent"), str(src)],
                                   capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                raise BuildError(f"building the guest agent failed: {e}") from None
            if p.returncode != 0:
                raise BuildError("building the guest agent failed: "
                                 + (p.stderr.strip().splitlines() or ["no output"])[-1])
    return final
