"""Count the TLB's slow-path work during one `pyvirt run`: native-code exits to
Python, page-table walks in Python, whole-TLB flushes.

    .venv/bin/python bench/tlb_counters.py [pyvirt run arguments...]
    e.g. bench/tlb_counters.py --command true
         bench/tlb_counters.py --kernel debian-kernel-Image --command true

Runs the VM in this process with counting wrappers around `mmu.walk`,
`Engine._native_exit` and `Hart.flush_tlb` (the wrappers slow the run down;
the counts, not the time, are the result).  Works on any pyvirt version that
has those three functions, so it can count before and after a change.  Where
the native code cache exists (codecache.py), its hits, misses and stores are
printed too; where the native page walk exists (native.walk_code), the TLB
refills it made (and how many were instruction fetches, where it walks those),
and each hart's TLB memory (Hart.tlb_bytes) at the end.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

from pyvirt import cli
from pyvirt.cpu.riscv import engine, hart, mmu, native

COUNTS: Counter[str] = Counter()


def _wrap(owner: Any, name: str, key: str) -> None:
    orig = getattr(owner, name)

    def counted(*args: Any, **kw: Any) -> Any:
        COUNTS[key] += 1
        return orig(*args, **kw)
    setattr(owner, name, counted)


def _watch_code_caches() -> list[Any]:
    try:
        from pyvirt.cpu.riscv import codecache
    except ImportError:
        return []
    made: list[Any] = []
    init = codecache.CodeCache.__init__

    def watched(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        made.append(self)
    codecache.CodeCache.__init__ = watched     # type: ignore[method-assign]
    return made


def _watch_harts() -> list[Any]:
    harts: list[Any] = []
    add = engine.Engine.add_hart

    def added(self: Any, h: Any) -> None:
        add(self, h)
        harts.append(h)
    engine.Engine.add_hart = added             # type: ignore[method-assign]
    return harts


def main() -> int:
    caches = _watch_code_caches()
    harts = _watch_harts()
    _wrap(mmu, "walk", "page-table walks in Python")
    _wrap(engine.Engine, "_native_exit", "native-code exits to Python")
    _wrap(hart.Hart, "flush_tlb", "whole-TLB flushes")
    start = time.monotonic()
    code = cli.main(["run", *sys.argv[1:]])
    wall = time.monotonic() - start
    for key in ("native-code exits to Python", "page-table walks in Python", "whole-TLB flushes"):
        print(f"{key}: {COUNTS[key]:,}")
    nwalks = getattr(native, "W_NWALKS", None)
    if nwalks is not None:
        print(f"native page walks (TLB refills): {sum(h._uq[nwalks] for h in harts):,}")
    nfwalks = getattr(native, "W_NFWALKS", None)
    if nfwalks is not None:
        print(f"  of which instruction fetches: {sum(h._uq[nfwalks] for h in harts):,}")
    for h in harts:
        if hasattr(h, "tlb_bytes"):
            sizes = h.tlb_bytes()
            print(f"hart {h.hartid} TLB: native tables {sizes['native tables'] / 1024:.0f} KiB, "
                  f"Python dicts {sizes['python dicts'] / 1024:.0f} KiB ({sizes['python entries']:,} entries)")
    for c in caches:
        print("code cache: " + ", ".join(f"{k} {v:,}" for k, v in c.stats.items()))
    print(f"wall (with the counters): {wall:.1f} s, exit {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
