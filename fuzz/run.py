"""Run one fuzz target (fuzz/targets.py) under atheris, coverage-guided, with limits.

    python fuzz/run.py TARGET [--seconds N] [--corpus DIR] [--rss-mb M] [--timeout S]
    python fuzz/run.py TARGET --replay FILE...     (run saved inputs, e.g. a crash)
    python fuzz/run.py --list

The process's address space is capped (RLIMIT_AS, --rss-mb plus room for the
interpreter) and libFuzzer's own -rss_limit_mb and per-input -timeout apply, so an
input that makes pyvirt allocate or spin without bound fails the run like a crash.
The corpus starts from the target's seeds; crashes land in fuzz/crashes/ (crash-*,
timeout-*, oom-*).  `make fuzz` runs every target; FUZZING.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def supervise() -> int:
    """Run this script again as a child with a scratch directory, and remove the directory
    after it (libFuzzer ends the process with exit(), past Python's cleanup)."""
    scratch = tempfile.mkdtemp(prefix="pyvirt-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        env = dict(os.environ, PYVIRT_FUZZ_TMP=scratch)
        return subprocess.call([sys.executable, __file__, *sys.argv[1:]], env=env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    if not os.environ.get("PYVIRT_FUZZ_TMP"):
        return supervise()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--rss-mb", type=int, default=1024)
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    ap.add_argument("--replay", nargs="*", type=Path)
    args, extra = ap.parse_known_args()
    # Cap the address space: the interpreter and atheris need about 1 GiB of it mapped.
    limit = (args.rss_mb + 1536) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    import atheris

    with atheris.instrument_imports(include=["pyvirt"]):
        import targets
        for mod in ("pyvirt.devices.virtio.blk", "pyvirt.devices.virtio.net", "pyvirt.devices.virtio.console",
                    "pyvirt.devices.virtio.rng", "pyvirt.devices.virtio.mmio", "pyvirt.devices.virtio.vsock",
                    "pyvirt.backends.vsock", "pyvirt.devices.virtio.queue",
                    "pyvirt.backends.qcow2", "pyvirt.backends.qcow2_format", "pyvirt.host.archive",
                    "pyvirt.host.control", "pyvirt.host.runner", "pyvirt.host.models", "pyvirt.request",
                    "pyvirt.vmm.snapcheck", "pyvirt.state", "pyvirt.spec", "pyvirt.vmm.migration",
                    "pyvirt.host.migration", "pyvirt.oci.tar", "pyvirt.oci.unpack", "pyvirt.oci.source",
                    "pyvirt.oci.store", "pyvirt.oci.guest", "pyvirt.oci.rootfs", "pyvirt.host.agent",
                    "pyvirt.backends.vhost_user"):
            __import__(mod)
    if args.list or not args.target:
        print("\n".join(targets.TARGETS))
        return 0
    fn = targets.TARGETS[args.target]
    if args.replay is not None:
        for p in args.replay:
            print(f"replaying {p}", flush=True)
            fn(p.read_bytes())
        return 0
    corpus = args.corpus or HERE / "corpus" / args.target
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(targets.SEEDS[args.target]()):
        (corpus / f"seed-{i}").write_bytes(seed)
    crashes = HERE / "crashes"
    crashes.mkdir(exist_ok=True)
    argv = [sys.argv[0], str(corpus), f"-max_total_time={args.seconds}", f"-rss_limit_mb={args.rss_mb}",
            f"-malloc_limit_mb={args.rss_mb}", f"-timeout={args.timeout}", f"-artifact_prefix={crashes}/{args.target}-",
            "-print_final_stats=1", *extra]            # (a later -artifact_prefix in extra wins)
    atheris.Setup(argv, fn)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
