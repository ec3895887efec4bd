"""Where one `pyvirt run` spends its time, by sampling (for hosts without py-spy).

    .venv/bin/python bench/pyprofile.py [pyvirt run arguments...]

Runs the VM in this process with a SIGPROF timer (1 ms of process CPU time) and
counts the innermost Python function at each sample.  Native code runs inside
a ctypes call, so its time shows as native.py's `run` (the dispatcher entry of
a native block), and is undercounted: the timer's expirations during one long
native call arrive as one signal.  Use it for the Python side; for the native
share, `perf record` and `perf report --sort dso` ("[JIT]" is native code).
"""

from __future__ import annotations

import signal
import sys
from collections import Counter
from types import FrameType

from pyvirt import cli

SAMPLES: Counter[str] = Counter()


def _sample(signum: int, frame: FrameType | None) -> None:
    if frame is not None:
        SAMPLES[f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"] += 1


def main() -> int:
    signal.signal(signal.SIGPROF, _sample)
    signal.setitimer(signal.ITIMER_PROF, 0.001, 0.001)
    try:
        cli.main(["run", *sys.argv[1:]])
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
    total = sum(SAMPLES.values()) or 1
    print(f"{total} samples")
    for name, n in SAMPLES.most_common(25):
        print(f"{100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
