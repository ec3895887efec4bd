"""The `pyvirt` snapshot commands (through pyvirtd):

    pyvirt snapshot VM NAME                  snapshot a running or paused VM (it goes on)
    pyvirt snapshots                         list them
    pyvirt snapshot-rm NAME                  delete one (refused while VMs made from it exist)
    pyvirt restore SNAPSHOT [--name VM]      a new VM that resumes where the snapshot was taken
    pyvirt clone SNAPSHOT --count N [--prefix P]   N new VMs, P-1..P-N, each its own identity
"""

from __future__ import annotations

import argparse
import json
from typing import Any

COMMANDS = ("snapshot", "snapshots", "snapshot-rm", "restore", "clone")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("snapshot", parents=[common], help="snapshot a running or paused VM (it goes on)")
    s.add_argument("vm", metavar="VM")
    s.add_argument("name", metavar="NAME", help="the snapshot's name")
    ls = sub.add_parser("snapshots", parents=[common], help="list pyvirtd's snapshots")
    ls.add_argument("--json", action="store_true", help="print them as JSON")
    r = sub.add_parser("snapshot-rm", parents=[common], help="delete a snapshot")
    r.add_argument("name", metavar="NAME")
    r = sub.add_parser("restore", parents=[common], help="start a new VM from a snapshot")
    r.add_argument("snapshot", metavar="SNAPSHOT")
    r.add_argument("--name", help="the new VM's name (default SNAPSHOT-random)")
    c = sub.add_parser("clone", parents=[common], help="start N VMs from one snapshot")
    c.add_argument("snapshot", metavar="SNAPSHOT")
    c.add_argument("--count", "-n", type=int, required=True, help="how many VMs")
    c.add_argument("--prefix", help="name them PREFIX-1..PREFIX-N (default: the snapshot's name)")


def run(args: argparse.Namespace, client: Any) -> int:
    if args.cmd == "snapshot":
        s = client.snapshot(args.vm, args.name)
        print(f"{s['name']} {s['dir']} ({s['size'] >> 20} MiB on disk)")
    elif args.cmd == "snapshots":
        snaps = client.snapshots()
        if args.json:
            print(json.dumps(snaps, indent=2))
            return 0
        width = max([4] + [len(s["name"]) for s in snaps])
        print(f"{'NAME':<{width}}  {'VM':<12}  {'MEMORY':>6}  {'DISK':>7}  USED BY")
        for s in snaps:
            print(f"{s['name']:<{width}}  {s['vm']:<12}  {s['memory'] >> 20:>5}M  {s['size'] >> 20:>6}M  "
                  f"{','.join(s['used_by']) or '-'}")
    elif args.cmd == "snapshot-rm":
        client.delete_snapshot(args.name)
        print(f"{args.name} deleted")
    elif args.cmd == "restore":
        vm = client.restore(args.snapshot, name=args.name)
        print(f"{vm['name']} {vm['state']}")
    else:
        for vm in client.clone(args.snapshot, args.count, prefix=args.prefix):
            print(f"{vm['name']} {vm['state']}")
    return 0
