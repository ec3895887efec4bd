"""Two ends of a live migration for tests and benchmarks, without pyvirtd: the source Vm runs
in this process, the destination in a child process (`python -m pyvirt.testing.migrate
ADDRESS TOKEN SECONDS [DISK_DIR]`) that accepts one migration on a Unix socket (ADDRESS a
path) or on TCP (ADDRESS tcp:HOST:PORT, port 0: any; the port it took is on its first line),
the one-time token checked (disks the source copies becoming new images in DISK_DIR), runs
the VM it received
for SECONDS and prints its console output, then a JSON line with how it ended (its run time,
exit, seconds to its first console output, instructions).  `migrate_once` does both ends for
a default guest running a command; `TICKER` is a guest command printing its uptime every
10 ms (builtins only: no fork in the loop but usleep's)."""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pyvirt.backends.char import BufferBackend
from pyvirt.request import VmRequest, resolve
from pyvirt.vmm.migration import Migration, MigrationError, MigrationStats, announce, receive
from pyvirt.vmm.vm import Vm, Watch


def guest_view(path: Path, fmt: str = "auto") -> bytes:
    """The whole disk image at `path` as a guest sees it (a qcow2 through its backing chain):
    what a copied disk must equal."""
    from pyvirt.backends.disk import open_disk
    d = open_disk(path, read_only=True, fmt=fmt)
    try:
        buf = bytearray(d.size)
        d.readinto(0, memoryview(buf))
        return bytes(buf)
    finally:
        d.close()


def destination(path: str, token: str, seconds: float, disk_dir: str | None = None) -> int:
    if path.startswith("tcp:"):
        host, _, port = path.removeprefix("tcp:").rpartition(":")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((host, int(port)))
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
    listener.listen(1)
    print(f"listening {listener.getsockname()[1] if path.startswith('tcp:') else ''}".strip(), flush=True)
    conn, _ = listener.accept()
    listener.close()
    console = BufferBackend(limit=1 << 20)
    try:
        vm = receive(conn, token, console, disk_dir=Path(disk_dir) if disk_dir else None)
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


def start_destination(path: Path | str, token: str, seconds: float,
                      disk_dir: Path | None = None) -> subprocess.Popen[str]:
    """The destination process, listening at `path` (a Unix socket, or tcp:HOST:PORT: then
    `p.address` is tcp:HOST:THE_PORT_IT_TOOK)."""
    p = subprocess.Popen([sys.executable, "-m", "pyvirt.testing.migrate", str(path), token, str(seconds),
                          *([str(disk_dir)] if disk_dir else [])], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    words = p.stdout.readline().split()
    if not words or words[0] != "listening":
        p.kill()
        raise RuntimeError("the migration destination did not start")
    addr = str(path)
    if addr.startswith("tcp:"):
        addr = f"{addr.rpartition(':')[0]}:{words[1]}"
    p.address = addr                                   # type: ignore[attr-defined]
    return p


TICKER = ('i=0; while true; do i=$((i+1)); read up idle < /proc/uptime; echo "tick $i $up"; '
          'usleep 10000; done')
TICK = re.compile(r"tick (\d+)(?: ([\d.]+))?")


def ticks(text: str) -> list[tuple[int, float]]:
    """(counter, guest uptime) of each tick line."""
    return [(int(m[1]), float(m[2] or 0)) for m in TICK.finditer(text)]


def migrate_once(workdir: Path, command: str, after: int = 50, memory: str = "256M", dest_seconds: float = 3.0,
                 run_on: float = 0.0, nets: list[str] | None = None, disks: list[str] | None = None,
                 tcp: bool = False, tls: Path | None = None, **kw: Any) -> tuple[MigrationStats, str, str, Vm]:
    """Boot the default guest running `command` here, migrate it to a child destination once it
    printed tick `after`; (stats, source console, destination output, the source Vm, closed).
    A migration that did not complete leaves the VM running here `run_on` seconds more.
    `nets`, `disks`: the VM's NICs and disks (as --net, --disk; disks the source copies --
    copy_storage=True -- arrive in workdir/dest).  `tcp`: over TCP on 127.0.0.1 (else a Unix
    socket), with a one-time random token either way.  `tls`: a --tls-creds directory: over
    TCP with mutual TLS, each end in its own process as pyvirtd's relay (testing/tlsproxy.py).
    `kw`: Migration's options."""
    token = secrets.token_urlsafe(24)
    (workdir / "dest").mkdir(exist_ok=True)
    dest = start_destination("tcp:127.0.0.1:0" if tcp and not tls else workdir / "mig.sock", token, dest_seconds,
                             workdir / "dest")
    sock: Path | str = dest.address                    # type: ignore[attr-defined]
    proxies = []
    if tls is not None:
        from pyvirt.testing import tlsproxy
        server, address = tlsproxy.start("server", tls, "tcp:127.0.0.1:0", str(sock))
        client, sock = tlsproxy.start("client", tls, str(workdir / "tls.sock"), address)
        proxies = [server, client]
    resolved = resolve(VmRequest(command=command, memory=memory, nets=nets or [], disks=disks or []))
    console = BufferBackend(limit=1 << 20)
    vm = Vm(resolved.spec, console)
    result: list[MigrationStats] = []
    mark = f"tick {after}".encode()
    ended: list[float] = []

    def trigger() -> None:
        if not result and mark in console.output:
            result.append(MigrationStats())
            mig = Migration(vm, connect(sock), token, finished=lambda s: result.__setitem__(0, s), **kw)
            mig.attach()
        if result and result[0].outcome not in ("running", "completed"):
            ended.append(time.monotonic())
            if ended[-1] - ended[0] >= run_on:
                vm.request_quit()
    vm.watches.append(Watch(lambda: [], lambda ready: None, trigger))
    try:
        vm.run(timeout=600)
    finally:
        vm.close()
        resolved.cleanup()
    out, _ = dest.communicate(timeout=300)
    for p in proxies:
        p.communicate(timeout=60)
    if not result:
        raise RuntimeError(f"the guest never printed tick {after}: {bytes(console.output[-300:])!r}")
    return result[0], console.output.decode(errors="replace"), out, vm


def connect(path: Path | str) -> socket.socket:
    """A connection to a Unix socket path or tcp:HOST:PORT."""
    if str(path).startswith("tcp:"):
        host, _, port = str(path).removeprefix("tcp:").rpartition(":")
        return socket.create_connection((host, int(port)))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


__all__ = ["TICKER", "connect", "destination", "migrate_once", "start_destination", "ticks"]

if __name__ == "__main__":
    sys.exit(destination(sys.argv[1], sys.argv[2], float(sys.argv[3]), *sys.argv[4:5]))
