"""Network throughput and latency of the default guest, pyvirt next to QEMU, in one run.

    .venv/bin/python bench/net.py [--runs N] [--mib N] [--engine E]

Both VMMs boot the same kernel and initramfs with the same command line and
get the same virtio-net device over virtio-mmio (no offloads offered by
either: QEMU's `csum`, `guest_csum`, `gso` and TSO features are switched off
so that both guests see the same NIC), and the same back ends:

* user-mode networking: one `passt` per VM with the same options: pyvirt's
  own (`--net user,port=HOST:5001,host-loopback=on`: `passt --fd` on a
  socket pair, `-t 127.0.0.1/HOST:5001`, the gateway mapped to the host's
  loopback), and for QEMU the same command started here,
  the other end of its socket pair given to `-netdev stream,addr.type=fd`.
  - guest -> host: the guest pipes `dd if=/dev/zero` (64 KiB blocks) into
    busybox `nc` to a sink on the host's loopback (passt's gateway address);
    the sink times first byte to end of stream.
  - host -> guest: the host connects to the forwarded port, sends the same
    amount and waits until the guest's `nc -l` closes the connection (so
    every byte has reached the guest), timed from connect.
* VM -> VM: two guests on one pyvirt network (`pyvirt network create`, the
  L2 switch on a `-netdev stream` socket), static addresses; the sender
  times `dd | nc` with /proc/uptime (10 ms resolution) and its `nc` ends only
  after the receiver has read everything and closed.  Two QEMU guests join
  the same kind of pyvirt network: QEMU's own `-netdev stream` client.
  - latency: `ping -c 20 -i 0.2` between the two guests, round trip average.

Transfers are kept short (4 MiB by default, about 10 s on pyvirt): the
passt of Debian 12 (0.0~git20230309) resets a guest -> host connection 24 s
after it opened, under QEMU as under pyvirt (a slow 8 MB upload from a QEMU
guest was cut at 6.9 MB, exactly 24 s in; passt's packet capture shows its
RST with nothing wrong before it).

No outside address is used.  Ping through passt is not measured: passt
answers ICMP with the host's ping sockets, which this host's
net.ipv4.ping_group_range does not allow.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pyvirt.engines import ENGINES, default_engine
from pyvirt.images import default_image

GATEWAY = "$(ip route | awk '/^default/ {print $3}')"
BLOCK = 65536
# A listening busybox nc half-closes when its stdin ends: listeners read a FIFO held open.
LISTEN = "mkfifo /tmp/p && exec 3<>/tmp/p && "
NET_A, NET_B = "10.9.0.1", "10.9.0.2"
# QEMU's virtio-net with every offload off (over -netdev stream it would offer none anyway).
QEMU_NIC = ("csum=off,guest_csum=off,gso=off,host_tso4=off,host_tso6=off,guest_tso4=off,guest_tso6=off,"
            "mrg_rxbuf=on")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Vmm:
    """How to start one guest under pyvirt or QEMU with a NIC on a stream socket."""

    def __init__(self, who: str, engine: str, kernel: Path, initrd: Path, append: str) -> None:
        self.who, self.engine, self.kernel, self.initrd, self.append = who, engine, kernel, initrd, append

    def argv(self, net: str, where: str, mac: str, command: str, timeout: int) -> list[str]:
        """`net`: "stream" (`where` a socket path), "user" (`where` HOST:GUEST, pyvirt's own passt) or
        "fd" (`where` a socket descriptor joined to a passt, for QEMU)."""
        if self.who == "pyvirt":
            nic = (f"stream={where},mac={mac}" if net == "stream"
                   else f"user,port={where},mac={mac},host-loopback=on")
            return [sys.executable, "-m", "pyvirt", "run", "--engine", self.engine, "--timeout", str(timeout),
                    "--net", nic, "--command", command]
        addr = f"addr.type=unix,addr.path={where}" if net == "stream" else f"addr.type=fd,addr.str={where}"
        cmd64 = base64.b64encode(command.encode()).decode()
        return ["timeout", str(timeout), "qemu-system-riscv64", "-M", "virt", "-m", "256M", "-nographic",
                "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", f"{self.append} quiet loglevel=0 pyvirt.cmd={cmd64}",
                "-netdev", f"stream,id=n0,server=off,{addr}",
                "-device", f"virtio-net-device,netdev=n0,mac={mac},{QEMU_NIC}"]


def qemu_passt(host_port: int) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """passt for QEMU, started as pyvirt starts its own (backends/net.py PasstBackend): one end of a
    socket pair (`--fd`) and the same options; QEMU gets the other end (`-netdev stream,addr.type=fd`)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    p = subprocess.Popen(["passt", "--foreground", "--quiet", "--fd", str(theirs.fileno()), "--mtu", "1500",
                          "-t", f"127.0.0.1/{host_port}:5001"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=[theirs.fileno()])
    theirs.close()
    return p, ours


def sink(server: socket.socket, result: dict[str, float]) -> None:
    """Accept one connection and time it from the first byte to the end of the stream."""
    conn, _ = server.accept()
    with conn:
        first = None
        total = 0
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            if first is None:
                first = time.perf_counter()
            total += len(data)
        result["bytes"], result["seconds"] = total, time.perf_counter() - (first or time.perf_counter())


def send_to_guest(port: int, nbytes: int, deadline: float) -> float:
    """Send nbytes to the guest's forwarded port and wait until its nc closes; seconds from connect.
    Retried while the guest is not listening yet (passt then resets the connection)."""
    chunk = bytes(BLOCK)
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                t0 = time.perf_counter()
                left = nbytes
                while left:
                    left -= s.send(chunk[:min(left, BLOCK)])
                s.shutdown(socket.SHUT_WR)
                if s.recv(1) == b"":
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("host -> guest: no transfer completed")


def user_mode(vmm: Vmm, tmp: Path, mib: int) -> dict[str, float]:
    """Guest -> host and host -> guest through passt: MB/s each way."""
    nbytes = mib << 20
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    sink_port = server.getsockname()[1]
    host_port = free_port()
    passt, pair = qemu_passt(host_port) if vmm.who == "qemu" else (None, None)
    got: dict[str, float] = {}
    t = threading.Thread(target=sink, args=(server, got), daemon=True)
    t.start()
    command = (f"dd if=/dev/zero bs={BLOCK} count={nbytes // BLOCK} 2>/dev/null | nc {GATEWAY} {sink_port}; "
               f"{LISTEN}nc -l -p 5001 <&3 | wc -c")
    mac = "52:54:00:12:34:56"
    if pair is None:
        argv = vmm.argv("user", f"{host_port}:5001", mac, command, 900)
    else:
        argv = vmm.argv("fd", str(pair.fileno()), mac, command, 900)
    guest = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             pass_fds=[pair.fileno()] if pair else [])
    if pair is not None:
        pair.close()
    try:
        t.join(900)
        if got.get("bytes") != nbytes:
            raise RuntimeError(f"{vmm.who}: guest -> host delivered {got.get('bytes')} of {nbytes} bytes")
        down = send_to_guest(host_port, nbytes, time.monotonic() + 600)
        out, err = guest.communicate(timeout=600)
        if out.decode().split()[-1:] != [str(nbytes)]:
            raise RuntimeError(f"{vmm.who}: guest received {out[-200:]!r} {err[-300:]!r}")
    finally:
        for p in (guest, passt):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        server.close()
    return {"guest->host": nbytes / got["seconds"] / 1e6, "host->guest": nbytes / down / 1e6}


RTT = re.compile(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")
VMVM = re.compile(r"VMVM (\d+) ([\d.]+) ([\d.]+)")


def vm_to_vm(vmm: Vmm, tmp: Path, mib: int, runtime: Path) -> dict[str, float]:
    """Two guests on one pyvirt network: VM -> VM MB/s and ping round trip (ms)."""
    from pyvirt.network import create_network, remove_network
    name = f"bench{os.getpid()}"
    os.environ["PYVIRT_RUNTIME_DIR"] = str(runtime)
    sock = create_network(name)
    nbytes = mib << 20
    up = "ip addr add {ip}/24 dev eth0 && ip link set eth0 up && "
    a = up.format(ip=NET_A) + LISTEN + "nc -l -p 5000 <&3 | wc -c"
    b = (up.format(ip=NET_B) + f"for i in $(seq 60); do ping -c 1 -W 1 {NET_A} >/dev/null && break; done; "
         f"ping -c 20 -i 0.2 {NET_A} | tail -1; sleep 1; "
         f"t0=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero bs={BLOCK} count={nbytes // BLOCK} 2>/dev/null "
         f"| nc {NET_A} 5000; t1=$(cut -d' ' -f1 /proc/uptime); echo VMVM {nbytes} $t0 $t1")
    procs = [subprocess.Popen(vmm.argv("stream", str(sock), mac, cmd, 900), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for mac, cmd in (("52:54:00:09:00:01", a), ("52:54:00:09:00:02", b))]
    try:
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        remove_network(name)
    out_a, out_b = outs[0][0].decode(), outs[1][0].decode()
    m, rtt = VMVM.search(out_b), RTT.search(out_b)
    if not m or not rtt or out_a.split()[-1:] != [str(nbytes)]:
        raise RuntimeError(f"{vmm.who}: VM -> VM failed: A {out_a[-200:]!r} B {out_b[-300:]!r} "
                           f"{outs[1][1][-300:]!r}")
    return {"VM->VM": nbytes / (float(m.group(3)) - float(m.group(2))) / 1e6, "ping": float(rtt.group(2))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--engine", default=default_engine(), choices=ENGINES)
    args = ap.parse_args()
    for tool in ("passt", "qemu-system-riscv64"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/net.py: {tool} is not installed (scripts/setup-system.sh installs it)")
    img = default_image(build=True, progress=False)
    append = " ".join(a for a in img.cmdline.split() if not a.startswith("earlycon"))
    results: dict[str, dict[str, list[float]]] = {"pyvirt": {}, "qemu": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for who in ("pyvirt", "qemu"):
                vmm = Vmm(who, args.engine, img.kernel, img.initrd, append)
                r = user_mode(vmm, Path(tmp), args.mib)
                r.update(vm_to_vm(vmm, Path(tmp), args.mib, Path(tmp) / "run"))
                for k, v in r.items():
                    results[who].setdefault(k, []).append(v)
                print(who, {k: round(v, 3) for k, v in r.items()}, file=sys.stderr, flush=True)
    print(f"default guest, {args.mib} MiB per TCP transfer (busybox nc, 64 KiB writes), no offloads, "
          f"engine {args.engine}, runs {args.runs} ({sys.implementation.name} {sys.version.split()[0]})")
    print("| measurement | pyvirt (min / median / max) | QEMU (min / median / max) | pyvirt / QEMU |")
    print("|---|---:|---:|---:|")
    for name in ("guest->host", "host->guest", "VM->VM", "ping"):
        unit = "ms" if name == "ping" else "MB/s"
        p, q = results["pyvirt"][name], results["qemu"][name]
        fmt = (lambda v: f"{v:.2f}") if unit == "ms" or max(p + q) < 100 else (lambda v: f"{v:,.0f}")
        print(f"| {name} ({unit}) | {fmt(min(p))} / {fmt(statistics.median(p))} / {fmt(max(p))} | "
              f"{fmt(min(q))} / {fmt(statistics.median(q))} / {fmt(max(q))} | "
              f"{statistics.median(p) / statistics.median(q):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
