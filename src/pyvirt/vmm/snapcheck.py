"""Checking a snapshot's machine state before any of it is loaded.

A snapshot file is untrusted input, like the guest.  Every value of the state
goes through a schema built from the machine it is loaded into.  Each
component declares its own beside its `save()`/`load()` (`state_schema()`:
the devices in devices/, the hart in cpu/riscv/hart.py, the clock; the
combinators are in pyvirt/state.py); this module only assembles the board's:
types, exact key sets, list lengths (the number of harts, queues, ports),
integer ranges (nothing that sizes an allocation or indexes a table is
unbounded) and the WARL rules the CPU relies on.  The result is the state with
bytes decoded (the state file stores them as base64), ready for the
components' `load()`.  A mismatch is one ConfigError naming the path of the
bad value, e.g. ``harts[0].priv``.
"""

from __future__ import annotations

from typing import Any

from pyvirt.errors import ConfigError
from pyvirt.state import Schema, encode_bytes, integer, items, optional, record

__all__ = ["check_state", "component_schema", "encode_bytes", "machine_schema"]


def component_schema(component: Any) -> Schema:
    """The schema a component declares for its state; ConfigError if it declares none."""
    declare = getattr(component, "state_schema", None)
    if declare is None:
        raise ConfigError(f"no snapshot schema for device {type(component).__name__}")
    schema: Schema = declare()
    return schema


def machine_schema(board: Any) -> Schema:
    """The schema of `VirtBoard.save_state()` for this board."""
    bus = board.bus
    devices = {name: component_schema(dev) for _, _, dev, name in bus.regions()}
    return record(
        {
            "clock": component_schema(board.clock),
            "harts": items([component_schema(h) for h in board.harts]),
            "devices": record(devices),
            "tohost": optional(integer(bus.ram_base, bus.ram_end - 8)),
            "dtb_addr": integer(0, bus.ram_end),
        }
    )


def check_state(board: Any, state: Any) -> dict[str, Any]:
    """`state` (parsed JSON) checked against `board`; bytes decoded.  ConfigError if bad."""
    return machine_schema(board)(state, "")
