"""The CPU engines, named here once, and which one a VM gets when none is named.

    interp   every instruction through generic handlers: the reference
    jit      hot blocks translated to Python functions
    native   blocks translated to x86-64 machine code (x86-64 Linux hosts)

`PYVIRT_ENGINE` in the environment overrides the default for everything that
does not name an engine itself (the CLI without --engine, VmSpec, the tests),
so a whole test run can be forced onto one tier: `PYVIRT_ENGINE=interp make test`.
"""

from __future__ import annotations

import os
import platform
from typing import Literal, get_args

from pyvirt.errors import ConfigError

# The one list of engine names: the CLI's --engine choices, VmSpec's and the API model's field
# types and the engine's own check all derive from it.
EngineName = Literal["interp", "jit", "native"]
ENGINES: tuple[EngineName, ...] = get_args(EngineName)


def native_available() -> bool:
    """The native tier emits x86-64 code for the System V ABI."""
    return platform.machine() in ("x86_64", "AMD64") and platform.system() == "Linux"


def default_engine() -> EngineName:
    forced = os.environ.get("PYVIRT_ENGINE")
    if forced:
        if forced not in ENGINES:
            raise ConfigError(f"PYVIRT_ENGINE={forced!r} is not an engine (one of {', '.join(ENGINES)})")
        if forced == "native" and not native_available():
            raise ConfigError("PYVIRT_ENGINE=native needs an x86-64 Linux host")
        return forced
    return "native" if native_available() else "jit"
