"""The `pyvirt` commands that talk to pyvirtd (through pyvirt.Client).

    pyvirt daemon [--foreground]            start pyvirtd (in the background unless --foreground)
    pyvirt create NAME [the VM flags of pyvirt run: --cpus, --memory, --image, --root-disk, --kernel,
                  --initrd, --append, --bios, --disk, --net, --port, --vport, --command, ...]
                  [--cpu-quota CPUS] [--memory-limit SIZE]   (flags: pyvirt/request.py OPTIONS)
    pyvirt start|stop [--timeout S]|kill|pause|resume NAME
    pyvirt rm [--force] NAME
    pyvirt ls
    pyvirt inspect NAME                     (JSON)
    pyvirt console NAME                     (Ctrl-] detaches; the VM keeps running)
    pyvirt logs [-f] [--tail BYTES] NAME
    pyvirt snapshot VM NAME | snapshots | snapshot-rm NAME | restore SNAP [--name VM]
          | clone SNAP --count N [--prefix P]     (host/snapshot_cli.py)
    pyvirt incoming NAME [--tcp HOST:PORT] [--allow FILE] | migrate VM --to ADDRESS --token T
          [--downtime MS] [--timeout S] [--on-timeout cancel|force]   (host/migration_cli.py)
    pyvirt exec VM [-t] [-i] -- CMD... | shell VM | cp VM:PATH LOCAL | cp LOCAL VM:PATH
          | port VM HOST:GUEST                    (host/agent_cli.py, through the guest agent)

Every command takes --state-dir DIR (default $PYVIRT_STATE_DIR or
~/.local/state/pyvirt).  The daemon is not started on demand: without one,
a command says so (start it with `pyvirt daemon`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import socket
import sys
import termios
import time
import tty
from typing import Any

from pyvirt import request
from pyvirt.errors import ConfigError
from pyvirt.host import agent_cli, migration_cli, snapshot_cli

COMMANDS = ("daemon", "create", "start", "stop", "kill", "pause", "resume", "rm", "ls", "inspect",
            "console", "logs", "export", "import", *snapshot_cli.COMMANDS, *migration_cli.COMMANDS,
            *agent_cli.COMMANDS)
DETACH = 0x1D          # Ctrl-]
MAX_LOG_TAIL = 1 << 20  # what the API gives of a log at once
BUSY = b"\r\npyvirt: the console is busy"      # how a runner's console.sock refuses a second client


def add_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", metavar="DIR",
                        help="pyvirtd's state directory (default $PYVIRT_STATE_DIR or ~/.local/state/pyvirt)")
    d = sub.add_parser("daemon", parents=[common], help="start pyvirtd, the hypervisor service (or stop it, "
                                                        "or say whether it runs)")
    d.add_argument("action", nargs="?", choices=("start", "stop", "status"), default="start",
                   help="start (the default; prints its socket), stop (SIGTERM: the VMs go on running) or "
                        "status (exit status 0 when it runs, 3 when not)")
    d.add_argument("--foreground", action="store_true", help="run in this process, logging to the terminal "
                                                             "(default: in the background, logging to "
                                                             "pyvirtd.log)")
    d.add_argument("--tls-creds", metavar="DIR", help="x509 credentials for migrations over TCP (as "
                                                      "`pyvirtd --tls-creds`; docs/migration.md)")

    c = sub.add_parser("create", parents=[common], help="define a VM in pyvirtd (started with `pyvirt start`)")
    c.add_argument("name", metavar="NAME")
    request.add_arguments(c, request.CREATE)        # pyvirt run's flags (request.OPTIONS)

    for name, text in (("start", "start a VM"), ("kill", "end a VM now"),
                       ("pause", "pause a VM (no CPU use, its clock stops)"), ("resume", "resume a paused VM"),
                       ("inspect", "a VM's definition and state, as JSON"),
                       ("console", "attach this terminal to a VM's serial console (Ctrl-] detaches)")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("name", metavar="NAME")
    s = sub.add_parser("stop", parents=[common], help="power a VM off (forced after --timeout)")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the guest (default 10)")
    r = sub.add_parser("rm", parents=[common], help="delete a VM")
    r.add_argument("name", metavar="NAME")
    r.add_argument("--force", "-f", action="store_true", help="kill it first if it is running")
    ls = sub.add_parser("ls", parents=[common], help="list pyvirtd's VMs")
    ls.add_argument("--json", action="store_true", help="print them as JSON (what inspect shows, per VM)")
    lg = sub.add_parser("logs", parents=[common], help="a VM's console output")
    lg.add_argument("name", metavar="NAME")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new output until the VM ends")
    lg.add_argument("--tail", type=int, default=None, metavar="LINES",
                    help="start with the last LINES lines (default: all of the log, up to its last MiB)")
    ex = sub.add_parser("export", parents=[common], help="write a stopped VM to an archive (FILE.pyvirt)")
    ex.add_argument("name", metavar="VM")
    ex.add_argument("file", metavar="FILE")
    ex.add_argument("--snapshot", metavar="NAME",
                    help="export the VM as of this snapshot of it, and the snapshot (RAM, state, disks)")
    im = sub.add_parser("import", parents=[common], help="define a VM from an export archive")
    im.add_argument("file", metavar="FILE")
    im.add_argument("--name", metavar="NEW", help="the new VM's name (default: the exported VM's)")
    im.add_argument("--net", action="append", default=[], metavar="NET",
                    help="a network interface, as `pyvirt create --net` (the archive's own are never "
                         "used; an archive with a snapshot needs as many as it saved)")
    im.add_argument("--memory-limit", metavar="SIZE",
                    help="the runner's memory ceiling (default: the archive's guest RAM + 256M)")
    im.add_argument("--cpu-quota", type=float, metavar="CPUS", help="CPU time ceiling in CPUs")
    snapshot_cli.add_parsers(sub, common)
    migration_cli.add_parsers(sub, common)
    agent_cli.add_parsers(sub, common)


# the API's field names as the CLI's flags, for messages
FIELD_FLAGS = {**request.FLAG, "count": "--count", "prefix": "--prefix", "timeout": "--timeout", "tail": "--tail"}


def in_flags(message: str) -> str:
    """An API error message in the CLI's words: `memory_limit 1M: ...` -> `--memory-limit 1M: ...`,
    without pydantic's 'invalid request' wrapper."""
    parts = []
    for part in message.removeprefix("invalid request: ").split("; "):
        field, sep, rest = part.partition(" ")
        if field.rstrip(":") in FIELD_FLAGS:
            part = FIELD_FLAGS[field.rstrip(":")] + field[len(field.rstrip(":")):] + sep + rest
        elif field == "name" and sep:
            part = rest
        parts.append(part)
    text = "; ".join(parts)
    for name in ("memory_limit", "cpu_quota"):
        text = re.sub(rf"\b{name}\b", FIELD_FLAGS[name], text)
    return text.replace("(at least memory + ", "(at least --memory + ")


def run(args: argparse.Namespace) -> int:
    from pyvirt.host.client import ApiError

    try:
        return _run(args)
    except ApiError as e:
        raise ApiError(e.status, in_flags(e.detail)) from None


def _run(args: argparse.Namespace) -> int:
    from pyvirt.host.client import Client

    if args.cmd == "daemon":
        return _daemon(args)
    with Client(state_dir=args.state_dir) as client:
        if args.cmd == "create":
            vm = client.create(args.name, request.from_args(args, request.CREATE, absolute=True))
            print(f"{vm['name']} {vm['id']}")
            return 0
        if args.cmd in ("start", "kill", "pause", "resume"):
            vm = getattr(client, args.cmd)(args.name)
            print(f"{vm['name']} {vm['state']}")
            return 0
        if args.cmd == "stop":
            if args.timeout < 0:
                raise ConfigError("--timeout must be 0 or more seconds")
            vm = client.stop(args.name, timeout=args.timeout)
            how = f" ({vm['reason']})" if vm.get("reason") and vm["reason"] != "poweroff" else ""
            print(f"{vm['name']} {vm['state']}{how}")
            return 0
        if args.cmd == "rm":
            client.delete(args.name, force=args.force)
            print(f"{args.name} deleted")
            return 0
        if args.cmd == "ls":
            vms = client.list()
            if args.json:
                print(json.dumps(vms, indent=2))
            else:
                _ls(vms)
            return 0
        if args.cmd == "inspect":
            print(json.dumps(client.inspect(args.name), indent=2))
            return 0
        if args.cmd == "logs":
            return _logs(client, args.name, args.follow, args.tail)
        if args.cmd == "console":
            return _console(client, args.name)
        if args.cmd == "export":
            out = client.export(args.name, os.path.abspath(args.file), snapshot=args.snapshot)
            with_snap = f" with its snapshot {out['snapshot']}" if out.get("snapshot") else ""
            print(f"{out['name']}{with_snap} exported to {out['path']} ({out['size']} bytes)")
            return 0
        if args.cmd == "import":
            vm = client.import_(os.path.abspath(args.file), name=args.name, nets=args.net,
                                memory_limit=args.memory_limit, cpu_quota=args.cpu_quota)
            print(f"{vm['name']} {vm['id']}" + (f" snapshot {vm['snapshot']}" if vm.get("snapshot") else ""))
            return 0
        if args.cmd in snapshot_cli.COMMANDS:
            return snapshot_cli.run(args, client)
        if args.cmd in migration_cli.COMMANDS:
            return migration_cli.run(args, client)
        if args.cmd in agent_cli.COMMANDS:
            return agent_cli.run(args, client)
    raise ConfigError(f"unknown command {args.cmd}")


def _daemon(args: argparse.Namespace) -> int:
    from pyvirt.host.daemon import serve, start_background, stop_daemon
    from pyvirt.host.paths import state_dir

    state = state_dir(args.state_dir)
    if args.action == "stop":
        pid = stop_daemon(state)
        print(f"pyvirtd stopped (pid {pid}; its VMs go on running)")
        return 0
    if args.action == "status":
        from pyvirt.host.client import Client, DaemonNotRunning
        try:
            with Client(state_dir=state, timeout=5) as client:
                info = client.info()
                vms = client.list()
        except DaemonNotRunning:
            print(f"pyvirtd is not running for {state}")
            return 3
        running = sum(1 for v in vms if v["state"] in ("running", "paused"))
        print(f"pyvirtd {info['version']} is running (pid {info['pid']}) on {state / 'pyvirtd.sock'}: "
              f"{len(vms)} VM(s), {running} running; log {state / 'pyvirtd.log'}")
        return 0
    if args.foreground:
        serve(state, tls_creds=args.tls_creds)
        return 0
    print(start_background(state, tls_creds=args.tls_creds))
    return 0


def _ls(vms: list[dict[str, Any]]) -> None:
    width = max([4] + [len(v["name"]) for v in vms])
    print(f"{'NAME':<{width}}  {'STATE':<8}  {'PID':>7}  CPUS  {'MEMORY':>6}  ID")
    for v in vms:
        pid = str(v["pid"]) if v["pid"] else "-"
        print(f"{v['name']:<{width}}  {v['state']:<8}  {pid:>7}  {v['cpus']:>4}  "
              f"{(v['memory'] or 0) >> 20:>5}M  {v['id']}")


def _write(data: str) -> None:
    sys.stdout.write(data)
    sys.stdout.flush()


def _logs(client: Any, name: str, follow: bool, tail: int | None) -> int:
    if tail is not None and tail < 0:
        raise ConfigError(f"--tail {tail}: must be 0 or more lines")
    chunk = client.logs(name, tail=MAX_LOG_TAIL)
    text = chunk["text"]
    if tail is not None:
        lines = text.splitlines(keepends=True)
        text = "".join(lines[len(lines) - tail:]) if tail else ""
    _write(text)
    offset = chunk["offset"]
    last_check = time.monotonic()
    while follow:
        chunk = client.logs(name, offset=offset)
        if chunk["offset"] != offset:
            _write(chunk["text"])
            offset = chunk["offset"]
            continue
        if time.monotonic() - last_check > 1.0:
            last_check = time.monotonic()
            if client.inspect(name)["state"] not in ("running", "paused"):
                break
        time.sleep(0.2)
    return 0


def _console(client: Any, name: str) -> int:
    vm = client.inspect(name)
    if vm["state"] not in ("running", "paused"):
        raise ConfigError(f"VM {name} is not running (state: {vm['state']})")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(vm["paths"]["console_socket"])
    except OSError as e:
        raise ConfigError(f"cannot attach to the console of {name}: {e.strerror}") from None
    # a runner that has a client already answers at once with its "busy" line and hangs up
    first = b""
    if select.select([s], [], [], 0.5)[0]:
        first = s.recv(65536)
        if not first or first.startswith(BUSY):
            s.close()
            raise ConfigError(f"the console of {name} is busy: another client is attached")
    sys.stderr.write(f"[attached to {name}'s console; Ctrl-] detaches]\r\n")
    if first:
        os.write(1, first)
    saved = None
    if os.isatty(0):
        saved = termios.tcgetattr(0)
        tty.setraw(0)
    ended = "detached"
    try:
        while True:
            ready, _, _ = select.select([0, s], [], [])
            if s in ready:
                data = s.recv(65536)
                if not data:
                    ended = "the console closed (the VM ended, or another client is attached)"
                    break
                os.write(1, data)
            if 0 in ready:
                data = os.read(0, 4096)
                if not data or DETACH in data:
                    s.sendall(data.split(bytes([DETACH]))[0])
                    break
                s.sendall(data)
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
        s.close()
    sys.stderr.write(f"\r\n[{ended}]\n")
    return 0
