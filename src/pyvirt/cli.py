"""The `pyvirt` command line.

    pyvirt run [--kernel IMAGE --initrd FILE --append ARGS | --bios ELF] [--cpus N]
               [--memory SIZE] [--disk PATH[,ro][,format=raw|qcow2]]... [--command CMD]
               [--engine interp|jit|native]
               [--net user[,port=H:G]...[,host-loopback=on]|stream=SOCK|network=NAME|tap=IF[,mac=MAC]]...
               [--port HOST:GUEST]...
    pyvirt run --image debian [--root-disk PATH] [--command CMD]
    pyvirt run ... [--snapshot-after SECONDS:DIR]
    pyvirt run --restore DIR [--overlay-dir DIR] [--timeout S]
    pyvirt image build [default|debian]
    pyvirt disk create NAME [--size SIZE] [--backing BASE [--backing-format raw|qcow2]]
                            [--cluster-size SIZE]
    pyvirt disk info NAME
    pyvirt network create NAME | ls | rm NAME
    pyvirt daemon | create | start | stop | kill | pause | resume | rm | ls | inspect | console | logs
                                    (VMs managed by pyvirtd: see pyvirt/host/cli.py)

Every user error ends in one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from pyvirt import __version__
from pyvirt.errors import ConfigError, PyvirtError

if TYPE_CHECKING:
    from pyvirt.spec import NetSpec

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvirt", description="pyvirt: virtual machines in Python")
    p.add_argument("--version", action="version", version=f"pyvirt {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="boot a virtual machine (the default guest with no arguments)")
    run.add_argument("--image", choices=("default", "debian"), default=None,
                     help="guest image: default (lean kernel, busybox initramfs) or debian (Debian trixie "
                          "with systemd on a disk; built on first use)")
    run.add_argument("--root-disk", metavar="PATH",
                     help="with --image debian: keep the root disk in PATH, a qcow2 overlay over the "
                          "cached image (made if missing); without it each run starts from a fresh, "
                          "throw-away overlay")
    run.add_argument("--kernel", help="Linux Image or ELF vmlinux to boot")
    run.add_argument("--initrd", help="initramfs/initrd to load")
    run.add_argument("--append", help="kernel command line")
    run.add_argument("--bios", help="M-mode ELF to start instead of the built-in SBI (OpenSBI, bare metal)")
    run.add_argument("--cpus", type=int, default=1, help="number of harts, 1..8 (default 1)")
    run.add_argument("--memory", "-m", default=None,
                     help="RAM size (default 256M; 1G with --image debian)")
    run.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]",
                     help="attach a disk image (raw or qcow2, probed; ,format=raw|qcow2 to say which) "
                          "as virtio-blk (repeatable)")
    run.add_argument("--no-rng", action="store_true", help="no virtio-rng device")
    run.add_argument("--vport", action="append", default=[], metavar="NAME=SOCKET",
                     help="a virtio-console port served on a Unix socket (repeatable); the name "
                          "hvc0 is the console port, others appear in the guest as named ports")
    run.add_argument("--net", action="append", default=[],
                     metavar="user|stream=SOCKET|network=NAME|tap=IFNAME",
                     help="a virtio-net interface (repeatable): user (passt user-mode networking; "
                          ",port=HOST:GUEST forwards a host TCP port on 127.0.0.1; ,host-loopback=on lets the "
                          "guest reach the host's 127.0.0.1 at the gateway address), stream=SOCKET (a Unix "
                          "socket speaking QEMU's -netdev stream framing), network=NAME (a switch made "
                          "by `pyvirt network create NAME`) or tap=IFNAME (a host TAP "
                          "device, needs root); ,mac=52:54:00:xx:xx:xx sets the MAC (default: random)")
    run.add_argument("--port", action="append", default=[], metavar="HOST:GUEST",
                     help="forward TCP port HOST on the host's 127.0.0.1 to GUEST in the guest "
                          "(repeatable; implies --net user when no --net is given)")
    run.add_argument("--engine", choices=("interp", "jit", "native"), default=None,
                     help="CPU engine: interp (reference interpreter), jit (Python blocks) or native "
                          "(x86-64 code; the default where the host allows; PYVIRT_ENGINE sets the default)")
    run.add_argument("--mmu", choices=("sv39", "sv48"), default="sv39", help="MMU mode in the device tree")
    run.add_argument("--command", "-c", metavar="CMD",
                     help="run CMD in the guest's shell (the default guest: from its /init; debian: once "
                          "systemd has booted), print its output, exit with its status")
    run.add_argument("--timeout", type=float, help="stop the VM after this many seconds (exit status 124)")
    run.add_argument("--stats", action="store_true", help="print instructions run and MIPS at exit")
    run.add_argument("--restore", metavar="DIR",
                     help="boot nothing: restore the snapshot in DIR and run it (the machine, disks and "
                          "network come from the snapshot; --engine, --timeout, --stats, "
                          "--snapshot-after still apply)")
    run.add_argument("--overlay-dir", metavar="DIR",
                     help="with --restore: keep the restored VM's disk overlays in DIR (default: "
                          "a temporary directory, removed at exit)")
    run.add_argument("--snapshot-after", metavar="SECONDS:DIR",
                     help="after SECONDS of running, save a snapshot to DIR and exit")

    image = sub.add_parser("image", help="guest images")
    isub = image.add_subparsers(dest="image_cmd", metavar="ACTION", parser_class=_Parser)
    ibuild = isub.add_parser("build", help="build (or find in the cache) a guest image: the default "
                                           "kernel and initramfs, or the Debian disk (needs root)")
    ibuild.add_argument("name", nargs="?", choices=("default", "debian"), default="default",
                        help="which image (default: default)")
    ibuild.add_argument("--configure-with", choices=("qemu", "pyvirt"), default="qemu",
                        help="debian: the VM that runs the riscv64 package configuration "
                             "(qemu-system-riscv64, about 7 min; or pyvirt itself, over an hour)")
    ipath = isub.add_parser("path", help="print where a guest image is cached")
    ipath.add_argument("name", nargs="?", choices=("default", "debian"), default="default",
                       help="which image (default: default)")

    disk = sub.add_parser("disk", help="disk images (qcow2)")
    dsub = disk.add_subparsers(dest="disk_cmd", metavar="ACTION", parser_class=_Parser)
    create = dsub.add_parser("create", help="create a qcow2 image, optionally over a backing file")
    create.add_argument("name", metavar="NAME", help="the new image file")
    create.add_argument("--size", help="virtual size, e.g. 8G (a bare number is MiB; "
                                       "default: the backing file's size)")
    create.add_argument("--backing", metavar="BASE", help="backing file (raw or qcow2), read-only "
                                                          "below the new image")
    create.add_argument("--backing-format", choices=("raw", "qcow2"),
                        help="the backing file's format (default: probed)")
    create.add_argument("--cluster-size", default="64K",
                        help="cluster size, 512 (bytes) to 2M (default 64K)")
    info = dsub.add_parser("info", help="describe a disk image and check its refcounts")
    info.add_argument("name", metavar="NAME", help="the image file")

    network = sub.add_parser("network", help="virtual networks between VMs (one L2 switch each)")
    nsub = network.add_subparsers(dest="network_cmd", metavar="ACTION", parser_class=_Parser)
    ncreate = nsub.add_parser("create", help="start a network's switch in the background")
    ncreate.add_argument("name", metavar="NAME", help="1 to 32 letters, digits, '_' or '-'")
    nsub.add_parser("ls", help="list networks: name, alive, ports connected, socket")
    nrm = nsub.add_parser("rm", help="stop a network's switch and remove its files")
    nrm.add_argument("name", metavar="NAME")

    from pyvirt.host import cli as host_cli
    host_cli.add_parsers(sub)
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    if args.restore is not None:
        return _cmd_restore(args)
    if args.overlay_dir is not None:
        raise ConfigError("--overlay-dir goes with --restore")
    from pyvirt.engines import default_engine
    from pyvirt.guestcmd import command_append
    from pyvirt.spec import DiskSpec, PortSpec, make_spec, parse_size

    disks = [DiskSpec.parse(d) for d in args.disk]
    ports = [PortSpec.parse(p) for p in args.vport]
    nets = _nets(args.net, args.port)
    kernel, initrd, append = args.kernel, args.initrd, args.append
    memory = args.memory
    if args.root_disk is not None and args.image != "debian":
        raise ConfigError("--root-disk goes with --image debian")
    overlay_dir = None
    if args.image == "debian":
        if args.kernel or args.initrd or args.bios:
            raise ConfigError("--image debian brings its own kernel and initrd (no --kernel/--initrd/--bios)")
        from pyvirt.images.debian_image import debian_image, root_overlay
        img = debian_image(build=True, progress=sys.stderr.isatty())
        kernel, initrd = str(img.kernel), str(img.initrd)
        if append is None:
            append = img.cmdline
        root, overlay_dir = root_overlay(img, args.root_disk)
        disks.insert(0, DiskSpec(path=root, format="qcow2"))
        memory = memory or "1G"
        if args.command is not None:
            # systemd stays quiet and no login prompt shares the console with the command's output
            # (TERM=dumb reaches PID 1's environment: systemd then sends no terminal resets)
            append += " TERM=dumb systemd.show_status=0 systemd.mask=serial-getty@ttyS0.service"
    elif args.bios is None and kernel is None:
        from pyvirt.images import default_image
        img = default_image(build=True, progress=sys.stderr.isatty())
        kernel = str(img.kernel)
        initrd = initrd or str(img.initrd)
        if append is None:
            append = img.cmdline
    elif args.command is not None and append is None:
        append = "console=ttyS0"
    if args.command is not None:
        if kernel is None:
            raise ConfigError("--command needs a Linux guest (not --bios alone)")
        append = command_append(append, args.command)
    spec = make_spec(cpus=args.cpus, memory=parse_size(memory or "256M"), kernel=kernel, initrd=initrd,
                     append=append, bios=args.bios, disks=disks, rng=not args.no_rng, ports=ports,
                     nets=nets, engine=args.engine or default_engine(), mmu=args.mmu)
    from pyvirt.vmm.vm import Vm

    def cleanup() -> None:
        if overlay_dir is not None:
            overlay_dir.cleanup()

    return _run_vm(args, lambda console: Vm(spec, console), args.command is None, cleanup)


def _cmd_restore(args: argparse.Namespace) -> int:
    """`pyvirt run --restore DIR`: the snapshot's VM, its console on stdio."""
    given = [flag for flag, value in (("--image", args.image), ("--root-disk", args.root_disk),
                                      ("--kernel", args.kernel), ("--initrd", args.initrd),
                                      ("--append", args.append), ("--bios", args.bios),
                                      ("--memory", args.memory), ("--disk", args.disk),
                                      ("--vport", args.vport), ("--net", args.net), ("--port", args.port),
                                      ("--command", args.command), ("--no-rng", args.no_rng))
             if value] + (["--cpus"] if args.cpus != 1 else [])
    if given:
        raise ConfigError(f"--restore takes the machine from the snapshot: {given[0]} does not apply")
    from pyvirt.vmm.snapshot import Overrides, load_snapshot

    def make(console: Any) -> Any:
        return load_snapshot(args.restore, console,
                             overrides=Overrides(overlay_dir=args.overlay_dir, engine=args.engine))

    return _run_vm(args, make, sys.stdin.isatty(), lambda: None)


def _run_vm(args: argparse.Namespace, make: Any, interactive: bool, cleanup: Any) -> int:
    """Run the VM `make(console)` builds with the console on stdio, as `pyvirt run` does."""
    from pyvirt.vmm.console import open_console
    snapshot_after = _snapshot_after(args.snapshot_after)
    with open_console(interactive=interactive) as console:
        try:
            vm = make(console)
        except BaseException:
            cleanup()
            raise
        console.on_quit = vm.request_quit
        timer = None
        if snapshot_after is not None:
            import threading
            seconds, directory = snapshot_after
            timer = threading.Timer(seconds, vm.request_snapshot, (directory, "quit"))
            timer.daemon = True
            timer.start()
        try:
            code = vm.run(timeout=args.timeout, restore_gc=False)    # the process ends with the VM
        finally:
            if timer is not None:
                timer.cancel()
            vm.close()
            cleanup()
    if hasattr(gc, "freeze"):
        gc.freeze()    # spare the interpreter's exit a scan of every translated block
    if args.stats:
        s = vm.stats
        sys.stderr.write(f"pyvirt: {s.instructions:,} instructions in {s.wall:.2f} s "
                         f"({s.mips:.2f} MIPS)\n")
    if code is None:
        return 124 if args.timeout and not vm.quit_requested else 0
    return code


def _snapshot_after(text: str | None) -> tuple[float, str] | None:
    if text is None:
        return None
    seconds, sep, directory = text.partition(":")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if not sep or not directory or not value >= 0:
        raise ConfigError(f"--snapshot-after {text}: expected SECONDS:DIR")
    return value, directory


def _nets(net_args: list[str], port_args: list[str]) -> list[NetSpec]:
    """--net and --port into NetSpecs: --port forwards go to the first user network (one is
    added when no --net is given)."""
    from pyvirt.spec import NetSpec, parse_port_forward

    nets = [NetSpec.parse(n) for n in net_args]
    forwards = [parse_port_forward(p, f"--port {p}") for p in port_args]
    if forwards:
        if not nets:
            nets.append(NetSpec(backend="user"))
        user = next((n for n in nets if n.backend == "user"), None)
        if user is None:
            raise ConfigError("--port needs a user network (--net user)")
        user.ports.extend(forwards)
    return nets


def _cmd_image(args: argparse.Namespace) -> int:
    from pyvirt.images import cached_default_image, default_image
    if args.image_cmd in ("build", "path") and args.name == "debian":
        from pyvirt.images.debian_image import cached_debian_image, debian_image
        if args.image_cmd == "build":
            dimg = debian_image(build=True, progress=sys.stderr.isatty(), configure_with=args.configure_with)
        else:
            found = cached_debian_image()
            if found is None:
                raise ConfigError("the Debian image is not built yet: run `pyvirt image build debian`")
            dimg = found
        print(f"kernel: {dimg.kernel}\ninitrd: {dimg.initrd}\ndisk: {dimg.disk}")
        return 0
    if args.image_cmd == "build":
        img = default_image(build=True, progress=sys.stderr.isatty())
        print(f"kernel: {img.kernel}\ninitrd: {img.initrd}")
        return 0
    if args.image_cmd == "path":
        cached = cached_default_image()
        if cached is None:
            raise ConfigError("the default image is not built yet: run `pyvirt image build`")
        print(f"kernel: {cached.kernel}\ninitrd: {cached.initrd}")
        return 0
    raise ConfigError("pyvirt image needs an action: build or path")


def _cmd_disk(args: argparse.Namespace) -> int:
    from pyvirt.backends.qcow2_tools import create_qcow2, describe_image, format_info
    from pyvirt.spec import parse_size
    if args.disk_cmd == "create":
        size = parse_size(args.size) if args.size is not None else None
        cs = args.cluster_size.strip()
        cluster_size = int(cs) if cs.isdigit() else parse_size(cs)    # a bare number: bytes
        create_qcow2(args.name, size, cluster_size=cluster_size,
                     backing=args.backing, backing_format=args.backing_format)
        return 0
    if args.disk_cmd == "info":
        info = describe_image(args.name)
        print(format_info(info))
        check = info.get("check")
        return 0 if check is None or not check.errors else 3
    raise ConfigError("pyvirt disk needs an action: create or info")


def _cmd_network(args: argparse.Namespace) -> int:
    from pyvirt.network import create_network, list_networks, remove_network
    if args.network_cmd == "create":
        print(create_network(args.name))
        return 0
    if args.network_cmd == "ls":
        nets = list_networks()
        if nets:
            width = max(4, *(len(n.name) for n in nets))
            print(f"{'NAME':<{width}}  ALIVE  PORTS  SOCKET")
            for n in nets:
                ports = "-" if n.ports is None else str(n.ports)
                print(f"{n.name:<{width}}  {'yes' if n.alive else 'no':<5}  {ports:<5}  {n.socket}")
        return 0
    if args.network_cmd == "rm":
        remove_network(args.name)
        return 0
    raise ConfigError("pyvirt network needs an action: create, ls or rm")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return _cmd_run(args)
        if args.cmd == "image":
            return _cmd_image(args)
        if args.cmd == "disk":
            return _cmd_disk(args)
        if args.cmd == "network":
            return _cmd_network(args)
        from pyvirt.host import cli as host_cli
        if args.cmd in host_cli.COMMANDS:
            return host_cli.run(args)
        _parser().print_help()
        return EXIT_USAGE
    except PyvirtError as e:
        sys.stderr.write(f"pyvirt: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
