"""What pyvirt needs from Python 3.10+ on the older interpreters it also runs on
(Debian 12's PyPy implements Python 3.9)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

# dataclass(**DATACLASS_SLOTS): slotted where the interpreter supports it.
DATACLASS_SLOTS: dict[str, Any] = {"slots": True} if sys.version_info >= (3, 10) else {}


def zip_strict(*iterables: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
    """zip(..., strict=True): the iterables must have the same length."""
    if sys.version_info >= (3, 10):
        return zip(*iterables, strict=True)
    return _zip_checked(*iterables)


def _zip_checked(*iterables: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
    sentinel = object()
    iters = [iter(i) for i in iterables]
    while True:
        items = [next(i, sentinel) for i in iters]
        if all(x is sentinel for x in items):
            return
        if any(x is sentinel for x in items):
            raise ValueError("zip_strict: iterables of different lengths")
        yield tuple(items)
