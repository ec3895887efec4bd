"""Count the translation work of one `pyvirt run`: blocks built, the addresses and
physical places they were built for, native code placed, code cache hits and misses.

    .venv/bin/python bench/block_counters.py [pyvirt run arguments...]

Runs the VM in this process with a counting wrapper around `Engine._build` (cheap
next to a build) and prints, when the engine closes, its stats (flushes, forgets,
invalidations), the code cache's (loaded, hits, misses, stored), the translator's
(native blocks and bytes placed), the number of builds, of distinct (privilege,
virtual pc, physical page) keys and of distinct (privilege, physical page, page
offset) places, and the wall time.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

from pyvirt import cli
from pyvirt.cpu.riscv import engine

BUILDS: Counter[tuple[int, int, int]] = Counter()


def main() -> int:
    build, close = engine.Engine._build, engine.Engine.close

    def counted_build(self: Any, key: tuple[int, int, int]) -> Any:
        BUILDS[key] += 1
        return build(self, key)

    def reporting_close(self: Any) -> None:
        out = sys.stderr
        print(f"engine: {self.stats}, blocks now {len(self.blocks):,}", file=out)
        if self.code_cache is not None:
            print(f"code cache: {self.code_cache.stats}", file=out)
        if self.native is not None:
            print(f"native code placed: {self.native.stats}", file=out)
        places = {(k[0], k[2], k[1] & 0xFFF) for k in BUILDS}
        print(f"blocks built {sum(BUILDS.values()):,} at {len(BUILDS):,} addresses "
              f"from {len(places):,} places in physical pages", file=out)
        close(self)

    engine.Engine._build = counted_build            # type: ignore[method-assign]
    engine.Engine.close = reporting_close           # type: ignore[method-assign]
    t = time.monotonic()
    code = cli.main(["run", *sys.argv[1:]])
    print(f"wall {time.monotonic() - t:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
