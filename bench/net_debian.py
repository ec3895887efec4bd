"""Network throughput and latency inside the Debian guest with Debian's iperf3, pyvirt next to QEMU.

    .venv/bin/python bench/net_debian.py [--runs N] [--seconds S] [--engine E] [--base-src DIR]

The Debian image (`pyvirt image build debian`, which installs iperf3) boots
twice under pyvirt (`pyvirt run --image debian --root-disk ... --net ...
--command ...`) and twice under qemu-system-riscv64 with the same kernel,
initramfs, kernel command line and a fresh qcow2 overlay over the same root
disk per guest, 1 GiB each.  Both VMMs give each guest the same virtio-net
devices over virtio-mmio, with no offloads offered by either: over a
`-netdev stream` back end QEMU offers none anyway (no vnet header from the
peer), and its `csum`/`guest_csum`/`gso`/TSO features are switched off
explicitly, as in bench/net.py.

* Guest A has two NICs: user-mode networking through `passt` (pyvirt's own
  `--net user,port=HOST:5001,host-loopback=on`; for QEMU the same `passt
  --fd` command on a socket pair, `-netdev stream,addr.type=fd`) and a port
  on a `pyvirt network` switch (10.9.0.1/24).  Guest B has only the switch
  port (10.9.0.2/24); QEMU's pair joins the same kind of switch with QEMU's
  own `-netdev stream` client.
* guest -> host: in A, `iperf3 -c <passt's gateway> -t S` to an `iperf3 -s`
  on the host's 127.0.0.1 (passt maps its gateway address to the host's
  loopback); host -> guest: the same with `-R` (the host sends).
* ping: `busybox ping -c 20 -i 0.2` from A to B, average round trip.
* VM -> VM: `iperf3 -c 10.9.0.2 -t S` from A to `iperf3 -s` in B.

`--base-src DIR` adds a third VMM, "base": pyvirt run from another source
tree (e.g. `git archive <commit> src | tar -x -C /tmp/base`, then
`--base-src /tmp/base/src`), so a change and the commit before it are
measured in the same run, each next to QEMU.

Figures are iperf3's receiver-side throughput.  S is kept at 8 s by default:
Debian 12's passt resets a guest -> host connection 24 s after it opened
(bench/net.py).  The boots are not timed.  Guest A waits `--settle` seconds (15)
once its network is up, before the first transfer, as bench/disk_debian.py does:
systemd's services still start and settle for a while after it reports the system
running, and the first rows would measure that as much as the network.  Both VMMs'
guests wait the same time.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from net import QEMU_NIC, RTT, free_port, qemu_passt  # noqa: E402

from pyvirt.engines import ENGINES, default_engine  # noqa: E402
from pyvirt.images.debian_image import DEBIAN_CMDLINE, cached_debian_image  # noqa: E402

MAC_USER, MAC_A, MAC_B = "52:54:00:12:34:56", "52:54:00:09:00:01", "52:54:00:09:00:02"
IPERF = re.compile(r"^R (g2h|h2g|v2v) .*?([\d.]+) Kbits/sec.*receiver", re.M)
PING = re.compile(r"^R ping (.*)$", re.M)
ROWS = (("g2h", "guest->host"), ("h2g", "host->guest"), ("v2v", "VM->VM"))


def switch_port(mac: str, ip: str, wait: bool = False) -> str:
    """Shell: give the interface with this MAC the address `ip`, and again every 2 s in the
    background (systemd-networkd, which finds no DHCP server on the switch, removed it once
    when it took the link over after the command had started).  With `wait` the interface
    is looked for until it is there (one run of guest B found none, udev renaming it, as
    far as can be told); guest A's command has no room for that loop on the kernel command
    line (1,024 bytes on riscv64)."""
    find = f"I=$(ip -o l|awk '/{mac[-8:]}/{{sub(/:$/,\"\",$2);print $2}}')"
    return ((f"until {find};[ \"$I\" ];do sleep 1;done;" if wait else f"{find};")
            + f"(while :;do ip a add {ip}/24 dev $I 2>/dev/null;ip l set $I up;sleep 2;done)&")


def commands(port: int, seconds: int, settle: int = 0) -> tuple[str, str]:
    """Guest A's and guest B's commands (each must fit the kernel command line)."""
    c = f"iperf3 -f k -t {seconds} -c"
    a = ("for i in $(seq 900);do ip r|grep -q ^def&&break;sleep 1;done;"
         "G=$(ip r|awk '/^def/{print $3;exit}');" + switch_port(MAC_A, "10.9.0.1")
         + (f"sleep {settle};" if settle else "")
         + f"echo R g2h $({c} $G -p {port}|grep receiver);"
         f"echo R h2g $({c} $G -p {port} -R|grep receiver);"
         "for i in $(seq 300);do busybox ping -c1 -W1 10.9.0.2 >/dev/null&&break;done;"
         "echo R ping $(busybox ping -c20 -i.2 10.9.0.2|tail -1);"
         f"for i in $(seq 60);do o=$({c} 10.9.0.2 2>&1)&&break;sleep 2;done;"
         "echo R v2v $(echo \"$o\"|grep receiver)")
    # B's server is started again until it has served a test: it exits 1 when it cannot bind
    # its address.  A --runs 3 invocation hung with B ended before A's VM -> VM test and A
    # waiting on nobody; a failed bind (the address gone for a moment) is the likeliest
    # cause found, not a proven one.
    b = (switch_port(MAC_B, "10.9.0.2", wait=True) + "until ip a show dev $I|grep -q 10.9.0.2;do sleep 1;done;"
         + "until timeout 3000 iperf3 -s -1 -B 10.9.0.2 >/dev/null;do sleep 1;done;echo R done")
    return a, b


def qemu_argv(kernel: Path, initrd: Path, root: Path, command: str, nics: list[str]) -> list[str]:
    """QEMU with the root disk and one virtio-net device per `-netdev stream` address in `nics`."""
    cmd64 = base64.b64encode(command.encode()).decode()
    append = (f"{DEBIAN_CMDLINE} TERM=dumb systemd.show_status=0 systemd.mask=serial-getty@ttyS0.service "
              f"quiet loglevel=1 pyvirt.cmd={cmd64}")
    argv = ["timeout", "3600", "qemu-system-riscv64", "-M", "virt", "-m", "1G", "-nographic",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-drive", f"file={root},format=qcow2,if=none,id=d0", "-device", "virtio-blk-device,drive=d0"]
    for i, (addr, mac) in enumerate(nics):
        argv += ["-netdev", f"stream,id=n{i},server=off,{addr}",
                 "-device", f"virtio-net-device,netdev=n{i},mac={mac},{QEMU_NIC}"]
    return argv


def pyvirt_argv(engine: str, root: Path, command: str, nets: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "pyvirt", "run", "--engine", engine, "--timeout", "3600",
            "--image", "debian", "--root-disk", str(root), "--command", command]
    for n in nets:
        argv += ["--net", n]
    return argv


def one_run(who: str, engine: str, tmp: Path, img, seconds: int, iperf_port: int,
            base_src: str | None = None, settle: int = 0) -> dict[str, float]:
    from pyvirt.network import create_network, remove_network
    os.environ["PYVIRT_RUNTIME_DIR"] = str(tmp / "run")
    name = f"benchd{os.getpid()}"
    sock = create_network(name)
    roots = [tmp / f"{who}-{g}.qcow2" for g in "ab"]
    for r in roots:
        r.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(img.disk), "-F", "raw", str(r)],
                       check=True)
    a, b = commands(iperf_port, seconds, settle)
    host_port = free_port()
    passt = pair = None
    env = dict(os.environ, PYTHONPATH=base_src) if who == "base" and base_src else None
    if who in ("pyvirt", "base"):
        argv_a = pyvirt_argv(engine, roots[0], a, [f"user,port={host_port}:5001,host-loopback=on,mac={MAC_USER}",
                                                   f"stream={sock},mac={MAC_A}"])
        argv_b = pyvirt_argv(engine, roots[1], b, [f"stream={sock},mac={MAC_B}"])
    else:
        passt, pair = qemu_passt(host_port)
        stream = f"addr.type=unix,addr.path={sock}"
        argv_a = qemu_argv(img.kernel, img.initrd, roots[0], a,
                           [(f"addr.type=fd,addr.str={pair.fileno()}", MAC_USER), (stream, MAC_A)])
        argv_b = qemu_argv(img.kernel, img.initrd, roots[1], b, [(stream, MAC_B)])
    procs = [subprocess.Popen(argv_b, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env),
             subprocess.Popen(argv_a, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              pass_fds=[pair.fileno()] if pair else [], env=env)]
    if pair is not None:
        pair.close()
    try:
        out_a = procs[1].communicate(timeout=3700)
        try:                                   # B ends with A's VM -> VM test; A may have failed
            out_b = procs[0].communicate(timeout=120)
        except subprocess.TimeoutExpired:
            procs[0].kill()
            out_b = procs[0].communicate()
        outs = [out_b, out_a]
    finally:
        for p in (*procs, passt):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        remove_network(name)
    out = outs[1][0].decode(errors="replace").replace("\r", "")
    got = {m.group(1): float(m.group(2)) * 1000 / 8 / 1e6 for m in IPERF.finditer(out)}    # MB/s
    ping = PING.search(out)
    rtt = RTT.search(ping.group(1)) if ping else None
    if len(got) != len(ROWS) or rtt is None:
        raise RuntimeError(f"{who}: incomplete result: A {out[-1500:]!r} {outs[1][1][-500:]!r} "
                           f"B {outs[0][0][-300:]!r} {outs[0][1][-300:]!r}")
    got["ping"] = float(rtt.group(2))
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--settle", type=int, default=15, help="seconds guest A waits before the first transfer")
    ap.add_argument("--engine", default=default_engine(), choices=ENGINES)
    ap.add_argument("--only", choices=("pyvirt", "qemu"), help="run one VMM only (profiling)")
    ap.add_argument("--base-src", help="also run pyvirt from this source tree (its src directory)")
    args = ap.parse_args()
    for tool in ("passt", "qemu-system-riscv64", "iperf3"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/net_debian.py: {tool} is not installed (scripts/setup-system.sh installs it)")
    img = cached_debian_image()
    if img is None:
        sys.exit("bench/net_debian.py: build the Debian image first (pyvirt image build debian)")
    iperf_port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    whos: tuple[str, ...] = (args.only,) if args.only else ("pyvirt", "qemu")
    if args.base_src:
        whos = ("base", *whos)
    results: dict[str, dict[str, list[float]]] = {w: {} for w in whos}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.runs):
                for who in whos:
                    r = one_run(who, args.engine, Path(tmp), img, args.seconds, iperf_port, args.base_src,
                                args.settle)
                    for k, v in r.items():
                        results[who].setdefault(k, []).append(v)
                    print(who, {k: round(v, 3) for k, v in r.items()}, file=sys.stderr, flush=True)
    finally:
        server.kill()
        server.wait()
    print(f"Debian guest, iperf3 -t {args.seconds} (receiver's figure), no offloads, engine {args.engine}, "
          f"settle {args.settle} s, runs {args.runs} ({sys.implementation.name} {sys.version.split()[0]})")
    ratios = [w for w in whos if w != "qemu"] if "qemu" in whos else []
    print("| measurement | " + " | ".join(f"{w} (min / median / max)" for w in whos)
          + "".join(f" | {w} / QEMU" for w in ratios) + " |")
    print("|---|" + "---:|" * (len(whos) + len(ratios)))
    for key, name in (*ROWS, ("ping", "ping")):
        unit = "ms" if key == "ping" else "MB/s"
        med = {w: statistics.median(results[w][key]) for w in whos}
        row = " | ".join(f"{min(results[w][key]):.2f} / {med[w]:.2f} / {max(results[w][key]):.2f}" for w in whos)
        print(f"| {name} ({unit}) | {row}" + "".join(f" | {med[w] / med['qemu']:.2f}" for w in ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
