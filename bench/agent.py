"""Guest agent round trips and copies: pyvirt's agent over virtio-vsock, next to the same
ssh-free request loop over a virtio-console port under pyvirt and under QEMU, in one run.

    PYTHONPATH=src .venv/bin/python bench/agent.py [--execs N] [--mib N] [--engine E]

QEMU has no vsock here (the host has no /dev/vhost-vsock, and QEMU has no Firecracker-style
Unix socket vsock), so pyvirt's agent has no QEMU twin.  What both VMMs can run is the
nearest agent-free equivalent: the default guest (same kernel, initramfs and command line)
runs a shell loop on a virtio-console port (QEMU: virtio-serial-device + virtserialport on
a chardev socket; pyvirt: --vport) that reads one command line, runs it, and answers
`rc N`:

* exec round trip: `/bin/true` run N times (fork and exec in the guest), host to answer;
* copy in: `head -c BYTES <&3 > /tmp/f` followed by the bytes, host to `rc 0`.

pyvirt's agent is measured on the same kind of guest (`pyvirt run --vsock`): `Agent.run
(["true"])` N times (a new vsock connection, fork and exec each time), and `write_file` /
`read_file` of the same size through /tmp.  The machine is shared with other work: the
figures are medians, pyvirt and QEMU measured back to back.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvirt.engines import ENGINES, default_engine
from pyvirt.host.agent import Agent
from pyvirt.images import default_image

LOOP = ("p=/dev/virtio-ports/bench; while [ ! -e $p ]; do sleep 0.1; done; exec 3<>$p; echo ready >&3; "
        "while read -r l <&3; do eval \"$l\"; echo \"rc $?\" >&3; done")


def _line(s: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            raise RuntimeError("the guest's loop ended")
        out += b
    return out


def port_loop(sock_path: Path, proc: subprocess.Popen[bytes], execs: int, nbytes: int) -> dict[str, float]:
    deadline = time.monotonic() + 300
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock_path))
            break
        except OSError:
            s.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the VM did not come up") from None
            time.sleep(0.2)
    with s:
        while _line(s) != b"ready\n":
            pass
        times = []
        for _ in range(execs):
            t0 = time.perf_counter()
            s.sendall(b"/bin/true\n")                # an external program: fork and exec
            assert _line(s) == b"rc 0\n"
            times.append(time.perf_counter() - t0)
        data = os.urandom(nbytes)
        t0 = time.perf_counter()
        s.sendall(b"head -c %d <&3 > /tmp/f\n" % nbytes + data)
        assert _line(s) == b"rc 0\n"
        copy_in = time.perf_counter() - t0
    return {"exec_ms": statistics.median(times) * 1e3, "in_mib_s": nbytes / copy_in / (1 << 20)}


def agent_run(agent: Agent, execs: int, nbytes: int, tmp: Path) -> dict[str, float]:
    agent.wait(300)
    times = []
    for _ in range(execs):
        t0 = time.perf_counter()
        assert agent.run(["true"])[0] == 0
        times.append(time.perf_counter() - t0)
    src = tmp / "src"
    src.write_bytes(os.urandom(nbytes))
    t0 = time.perf_counter()
    agent.write_file(src, "/tmp/f")
    copy_in = time.perf_counter() - t0
    t0 = time.perf_counter()
    agent.read_file("/tmp/f", tmp / "back")
    copy_out = time.perf_counter() - t0
    assert (tmp / "back").read_bytes() == src.read_bytes()
    return {"exec_ms": statistics.median(times) * 1e3, "in_mib_s": nbytes / copy_in / (1 << 20),
            "out_mib_s": nbytes / copy_out / (1 << 20)}


def stop(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--execs", type=int, default=20)
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--engine", choices=ENGINES, default=default_engine())
    args = ap.parse_args()
    img = default_image()
    nbytes = args.mib << 20
    cmd64 = base64.b64encode(LOOP.encode()).decode()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyvirt-bench-agent-") as d:
        tmp = Path(d)
        # pyvirt, the guest agent over virtio-vsock
        vs = tmp / "vsock.sock"
        p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--engine", args.engine, "--vsock", str(vs),
                              "--memory", "256M", "--command", "sleep 100000"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not vs.exists():
                time.sleep(0.1)
            rows.append(("pyvirt, agent over virtio-vsock", agent_run(Agent(vs), args.execs, nbytes, tmp)))
        finally:
            stop(p)
        # the same shell loop on a virtio-console port: pyvirt, then QEMU
        ps = tmp / "port-pyvirt.sock"
        p = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--engine", args.engine, "--memory", "256M",
                              "--vport", f"bench={ps}", "--append",
                              f"{img.cmdline} quiet loglevel=0 pyvirt.cmd={cmd64}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            rows.append(("pyvirt, shell loop on a virtio-console port", port_loop(ps, p, args.execs, nbytes)))
        finally:
            stop(p)
        qs = tmp / "port-qemu.sock"
        q = subprocess.Popen(["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-display", "none",
                              "-serial", "null", "-monitor", "none", "-kernel", str(img.kernel), "-initrd",
                              str(img.initrd), "-append", f"{img.cmdline} quiet loglevel=0 pyvirt.cmd={cmd64}",
                              "-device", "virtio-serial-device", "-chardev", f"socket,id=c0,path={qs},server=on,wait=off",
                              "-device", "virtserialport,chardev=c0,name=bench"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            rows.append(("qemu-system-riscv64 (TCG), shell loop on a virtio-console port",
                         port_loop(qs, q, args.execs, nbytes)))
        finally:
            stop(q)
    print(f"{'':64} {'exec round trip':>16} {'copy in':>12} {'copy out':>12}")
    for name, r in rows:
        out = f"{r['out_mib_s']:.2f} MiB/s" if "out_mib_s" in r else "-"
        print(f"{name:64} {r['exec_ms']:13.1f} ms {r['in_mib_s']:7.2f} MiB/s {out:>12}")
    print(f"(median of {args.execs} execs; copies of {args.mib} MiB; engine {args.engine}; "
          "the machine was shared with other work)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
