"""Two ends of a live migration for tests and benchmarks, without pyvirtd: the source Vm runs
in this process, the destination in a child process (`python -m pyvirt.testing.migrate
SOCKET TOKEN SECONDS`) that accepts one migration on a Unix socket, runs the VM it received
for SECONDS and prints its console output, then a JSON line with how it ended."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from pyvirt.backends.char import BufferBackend
from pyvirt.vmm.migration import Migration, MigrationError, announce, receive
from pyvirt.vmm.vm import Watch


def destination(path: str, token: str, seconds: float) -> int:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("listening", flush=True)
    conn, _ = listener.accept()
    listener.close()
    console = BufferBackend(limit=1 << 20)
    try:
        vm = receive(conn, token, console)
    except MigrationError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 3
    conn.close()
    t0 = time.monotonic()
    first: list[float] = []

    def on_tick() -> None:
        if not first and console.output:
            first.append(time.monotonic() - t0)
    vm.watches.append(Watch(lambda: [], lambda ready: None, on_tick))
    announce(vm)
    code = vm.run(timeout=seconds)
    vm.close()
    sys.stdout.write(console.output.decode(errors="replace"))
    print("\n" + json.dumps({"ran": time.monotonic() - t0, "exit": code, "first_output": first[0] if first else None,
                             "instructions": vm.stats.instructions}), flush=True)
    return 0


def start_destination(path: Path, token: str, seconds: float) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-m", "pyvirt.testing.migrate", str(path), token, str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "listening":
        p.kill()
        raise RuntimeError("the migration destination did not start")
    return p


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


__all__ = ["Migration", "connect", "destination", "start_destination"]

if __name__ == "__main__":
    sys.exit(destination(sys.argv[1], sys.argv[2], float(sys.argv[3])))
