"""Snapshot state schemas: the combinators each component builds its own from.

A snapshot file is untrusted input, like the guest.  Each component that has
`save()`/`load()` also has `state_schema()`, written beside them, returning a
`Schema`: a function `(value, path) -> value` that checks the parsed JSON of its
state (types, exact key sets, list lengths, integer ranges) and returns it with
bytes decoded (the state file stores them as base64).  A mismatch is one
`StateError` (a ConfigError) naming the path of the bad value, e.g.
``devices.virtio0.device.queues[0].size``.  vmm/snapcheck.py assembles the
machine's schema from its components' schemas.

This module is foundation: it imports nothing from devices, cpu or vmm.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from pyvirt.errors import ConfigError

M64 = (1 << 64) - 1
M32 = 0xFFFF_FFFF
MAX_TEXT = 4096


class StateError(ConfigError):
    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"snapshot state {where or '(top)'}: {why}")


Schema = Callable[[Any, str], Any]


def integer(lo: int, hi: int, rule: Callable[[int], str | None] | None = None) -> Schema:
    """An int in lo..hi (inclusive); `rule(v)` may name a further violation."""

    def check(v: Any, where: str) -> int:
        if type(v) is not int:
            raise StateError(where, f"expected an integer, not {type(v).__name__}")
        if not lo <= v <= hi:
            raise StateError(where, f"{v} is outside {lo}..{hi}")
        why = rule(v) if rule is not None else None
        if why:
            raise StateError(where, why)
        return v

    return check


def one_of(*values: int) -> Schema:
    allowed = set(values)
    return integer(
        min(values), max(values), lambda v: None if v in allowed else f"{v} is not one of {sorted(allowed)}"
    )


U8, U16, U32, U64 = integer(0, 0xFF), integer(0, 0xFFFF), integer(0, M32), integer(0, M64)


def boolean(v: Any, where: str) -> bool:
    if type(v) is not bool:
        raise StateError(where, f"expected true or false, not {type(v).__name__}")
    return v


def text(limit: int = MAX_TEXT) -> Schema:
    def check(v: Any, where: str) -> str:
        if type(v) is not str:
            raise StateError(where, f"expected a string, not {type(v).__name__}")
        if len(v) > limit:
            raise StateError(where, f"string longer than {limit}")
        return v

    return check


def blob(limit: int) -> Schema:
    """Bytes, stored as base64 text; at most `limit` of them."""

    def check(v: Any, where: str) -> bytes:
        if type(v) is not str or len(v) > 4 * (limit // 3 + 1):
            raise StateError(where, f"expected base64 text of at most {limit} bytes")
        try:
            data = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise StateError(where, "invalid base64") from None
        if len(data) > limit:
            raise StateError(where, f"{len(data)} bytes, more than {limit}")
        return data

    return check


def listof(item: Schema, lo: int, hi: int | None = None) -> Schema:
    """A list of `lo`..`hi` items (exactly `lo` when hi is None)."""
    top = lo if hi is None else hi

    def check(v: Any, where: str) -> list[Any]:
        if type(v) is not list:
            raise StateError(where, f"expected a list, not {type(v).__name__}")
        if not lo <= len(v) <= top:
            want = str(lo) if lo == top else f"{lo}..{top}"
            raise StateError(where, f"{len(v)} items where the machine has {want}")
        return [item(x, f"{where}[{i}]") for i, x in enumerate(v)]

    return check


def items(schemas: list[Schema]) -> Schema:
    """A list of exactly len(schemas) items, item i checked by schemas[i]."""

    def check(v: Any, where: str) -> list[Any]:
        listof(lambda x, w: x, len(schemas))(v, where)
        return [s(x, f"{where}[{i}]") for i, (s, x) in enumerate(zip(schemas, v))]

    return check


def record(fields: dict[str, Schema], optional: Iterable[str] = ()) -> Schema:
    """A dict with exactly these keys (those in `optional` may be missing)."""
    opt = set(optional)

    def check(v: Any, where: str) -> dict[str, Any]:
        if type(v) is not dict:
            raise StateError(where, f"expected an object, not {type(v).__name__}")
        extra = set(v) - set(fields)
        if extra:
            raise StateError(where, f"unknown entries {sorted(map(str, extra))[:5]}")
        missing = set(fields) - set(v) - opt
        if missing:
            raise StateError(where, f"missing entries {sorted(missing)[:5]}")
        return {k: s(v[k], f"{where}.{k}" if where else k) for k, s in fields.items() if k in v}

    return check


def optional(inner: Schema) -> Schema:
    def check(v: Any, where: str) -> Any:
        return None if v is None else inner(v, where)

    return check


class Stateful(Protocol):
    """A component whose state goes into a snapshot: `state_schema()` checks what
    `save()` returns, before `load()` gets it back."""

    def save(self) -> dict[str, Any]: ...

    def load(self, state: dict[str, Any]) -> None: ...

    def state_schema(self) -> Schema: ...


def encode_bytes(o: Any) -> Any:
    """json.dumps `default`: bytes and bytearrays become base64 text."""
    if isinstance(o, (bytes, bytearray)):
        return base64.b64encode(bytes(o)).decode("ascii")
    raise TypeError(f"{type(o).__name__} is not snapshot state")
