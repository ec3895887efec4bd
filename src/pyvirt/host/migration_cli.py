"""The `pyvirt` migration commands (through pyvirtd; docs/migration.md):

    pyvirt incoming NAME [--tcp HOST:PORT] [--allow FILE]...   on the destination: prints the
                                                               address and one-time token
    pyvirt migrate VM --to ADDRESS --token TOKEN [--downtime MS] [--timeout S]
                   [--on-timeout cancel|force] [--copy-storage-all] [--tls-hostname NAME]
                                                               on the source: move VM there
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from pyvirt.errors import ConfigError

COMMANDS = ("incoming", "migrate")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    i = sub.add_parser("incoming", parents=[common], help="let one VM arrive here by live migration")
    i.add_argument("name", metavar="NAME", help="the name the VM gets here")
    i.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP (default: a Unix socket)")
    i.add_argument("--allow", action="append", default=[], metavar="FILE",
                   help="a host file the VM may use here (a shared disk; repeat)")
    m = sub.add_parser("migrate", parents=[common], help="live-migrate a running VM to another pyvirtd")
    m.add_argument("vm", metavar="VM")
    m.add_argument("--to", required=True, metavar="ADDRESS", help="unix:/PATH or tcp:HOST:PORT (from "
                                                                   "`pyvirt incoming` there)")
    m.add_argument("--token", default=os.environ.get("PYVIRT_MIGRATION_TOKEN"),
                   help="the destination's one-time token (default $PYVIRT_MIGRATION_TOKEN)")
    m.add_argument("--downtime", type=float, default=300, metavar="MS", help="the pause the guest may see "
                                                                              "(default 300 ms)")
    m.add_argument("--timeout", type=float, default=600, metavar="S", help="seconds before --on-timeout "
                                                                           "applies (default 600)")
    m.add_argument("--on-timeout", choices=("cancel", "force"), default="cancel",
                   help="cancel: the VM stays here, running (default); force: pause it and finish")
    m.add_argument("--copy-storage-all", action="store_true",
                   help="copy the VM's disks too, flattened (as libvirt's flag): without it they must be "
                        "shared storage, --allow'ed on the destination")
    m.add_argument("--tls-hostname", metavar="NAME",
                   help="over TCP with TLS (pyvirtd --tls-creds): the name the destination's certificate must "
                        "carry (default: the host in --to)")


def run(args: argparse.Namespace, client: Any) -> int:
    if args.cmd == "incoming":
        out = client.incoming(args.name, tcp=args.tcp, allow=[os.path.abspath(a) for a in args.allow])
        print(f"{out['address']} {out['token']}")
        return 0
    if not args.token:
        raise ConfigError("--token: give the token `pyvirt incoming` printed on the destination")
    vm = client.migrate(args.vm, args.to, args.token, downtime=args.downtime / 1000, timeout=args.timeout,
                        on_timeout=args.on_timeout, copy_storage=args.copy_storage_all,
                        tls_hostname=args.tls_hostname)
    print(f"{vm['name']} {vm['state']} ({vm.get('reason')})")
    return 0
