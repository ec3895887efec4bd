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
import errno
import gc
import json
import os
import sys
from typing import Any, NoReturn

from pyvirt import request
from pyvirt.errors import ConfigError, PyvirtError
from pyvirt.version import __version__

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"pyvirt: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


def _subcommand_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)subcommand's parser that `args` came from: its --help is the one to read."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, action.dest, None) if action is not None else None
        if action is None or chosen not in action.choices:
            return parser
        parser = action.choices[chosen]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; unknown ones are reported by the subcommand's parser (whose --help lists
    the flags), and the top-level --state-dir goes to the pyvirtd commands as theirs."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _subcommand_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    top = getattr(args, "top_state_dir", None)
    if top is not None:
        if not hasattr(args, "state_dir"):
            _subcommand_parser(parser, args).error("--state-dir goes with the pyvirtd commands "
                                                   "(daemon, create, ls, ...)")
        if args.state_dir is None:
            args.state_dir = top
    return args


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvirt", description="pyvirt: virtual machines in Python")
    p.add_argument("--version", action="version", version=f"pyvirt {__version__}")
    p.add_argument("--state-dir", metavar="DIR", dest="top_state_dir",
                   help="pyvirtd's state directory, for the pyvirtd commands (as their --state-dir)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="boot a virtual machine (the default guest with no arguments)")
    request.add_arguments(run, request.RUN)        # the flags of pyvirt create too (request.OPTIONS)
    run.add_argument("--jail", action="store_true",
                     help="confine the VMM once the VM is built, as pyvirtd's runners are (host/jail.py): "
                          "a guest reboot then ends the run")

    image = sub.add_parser("image", help="guest images")
    isub = image.add_subparsers(dest="image_cmd", metavar="ACTION", parser_class=_Parser)
    ibuild = isub.add_parser("build", help="build (or find in the cache) a guest image: the default "
                                           "kernel and initramfs, or the Debian disk (needs root)")
    ibuild.add_argument("name", nargs="?", choices=("default", "debian"), default="default",
                        help="which image (default: default)")
    ibuild.add_argument("--configure-with", choices=("qemu", "pyvirt"), default="pyvirt",
                        help="debian: the VM that runs the riscv64 package configuration "
                             "(pyvirt itself, about 18 min here; or qemu-system-riscv64, about 11)")
    ipath = isub.add_parser("path", help="print where a guest image is cached")
    ipath.add_argument("name", nargs="?", choices=("default", "debian"), default="default",
                       help="which image (default: default)")

    disk = sub.add_parser("disk", help="disk images (qcow2)")
    dsub = disk.add_subparsers(dest="disk_cmd", metavar="ACTION", parser_class=_Parser)
    create = dsub.add_parser("create", help="create a qcow2 image, optionally over a backing file")
    create.add_argument("name", metavar="NAME", help="the new image file")
    create.add_argument("--size", help="virtual size, e.g. 8G, 1.5G or 512M (a bare number is GiB; "
                                       "default: the backing file's size)")
    create.add_argument("--backing", metavar="BASE", help="backing file (raw or qcow2), read-only "
                                                          "below the new image")
    create.add_argument("--backing-format", choices=("raw", "qcow2"),
                        help="the backing file's format (default: probed)")
    create.add_argument("--cluster-size", default="64K",
                        help="cluster size, 512 (bytes) to 2M (default 64K)")
    info = dsub.add_parser("info", help="describe a disk image and check its refcounts")
    info.add_argument("name", metavar="NAME", help="the image file")
    info.add_argument("--json", action="store_true", help="print it as JSON")

    network = sub.add_parser("network", help="virtual networks between VMs (one L2 switch each)")
    nsub = network.add_subparsers(dest="network_cmd", metavar="ACTION", parser_class=_Parser)
    ncreate = nsub.add_parser("create", help="start a network's switch in the background")
    ncreate.add_argument("name", metavar="NAME", help="1 to 32 letters, digits, '_' or '-'")
    nls = nsub.add_parser("ls", help="list networks: name, alive, ports connected, socket")
    nls.add_argument("--json", action="store_true", help="print them as JSON")
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
    req = request.from_args(args, request.RUN)
    if args.snapshot_after is not None and req.shares:
        from pyvirt.vmm.snapshot import SHARE_REFUSAL
        raise ConfigError(SHARE_REFUSAL)
    got = request.resolve(req, pipe=args.snapshot_after is None)
    spec, pipe = got.spec, got.pipe
    from pyvirt.vmm.vm import Vm

    def make(console: Any) -> Vm:
        try:
            vm = Vm(spec, console)
            if pipe is not None:
                pipe.on_broken = vm.request_quit
                pipe.start()
            return vm
        except MemoryError:
            raise ConfigError(f"--memory {got.memory_typed}: this host cannot give the VM that much RAM") \
                from None
        except OSError as e:
            if e.errno == errno.ENOMEM:
                raise ConfigError(f"--memory {got.memory_typed}: this host cannot give the VM that "
                                  "much RAM") from None
            raise

    interactive = req.command is None and (req.oci is None or req.tty)
    code = _run_vm(args, make, interactive, got.cleanup, fresh=True,
                   forward=getattr(pipe, "send_signal", None))    # --oci: the first signal to the process
    return 1 if pipe is not None and pipe.broken else code      # as for a broken pipe on the console


def _cmd_restore(args: argparse.Namespace) -> int:
    """`pyvirt run --restore DIR`: the snapshot's VM, its console on stdio."""
    defaults = request.VmRequest.model_fields
    given = [o.flags[0] for o in request.OPTIONS
             if o.field not in (None, "engine", "vsock") and request.RUN in o.verbs
             and getattr(args, o.dest, None) not in (None, defaults[o.field].default)]
    if given:
        raise ConfigError(f"--restore takes the machine from the snapshot: {given[0]} does not apply")
    from pyvirt.vmm.restore import Overrides, load_snapshot

    def make(console: Any) -> Any:
        return load_snapshot(args.restore, console,
                             overrides=Overrides(overlay_dir=args.overlay_dir, engine=args.engine,
                                                 vsock=args.vsock))

    return _run_vm(args, make, sys.stdin.isatty(), lambda: None)


class Stopped(KeyboardInterrupt):
    """A signal ended `pyvirt run` (the VM's files and processes were cleaned up)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """While `pyvirt run` runs: SIGTERM, SIGINT and SIGHUP end the run as Ctrl-A x does
    (the VM is closed: disks written back, passt ended, temporary overlays removed), and
    `signum` says which came; a second one, or one before the VM runs, raises `Stopped`
    at once (the same cleanup runs on the way out).  With `forward` (--oci without -t), the
    first one goes to the container's process instead (as docker run's signal proxy), and
    the run ends when the process does; a further one ends it as above."""

    NAMES = ("SIGTERM", "SIGINT", "SIGHUP")

    def __init__(self, forward: Any = None) -> None:
        self.vm: Any = None
        self.signum: int | None = None
        self.forward = forward            # --oci: the first signal goes to the container's process
        self.forwarded = False
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.forward is not None and self.vm is not None and not self.forwarded:
            self.forwarded = self.forward(signum)
            if self.forwarded:
                return
        if self.signum is not None or self.vm is None:
            raise Stopped(signum)
        self.signum = signum
        self.vm.request_quit()

    def __enter__(self) -> _StopSignals:
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self                   # (only the main thread can handle signals)
        for name in self.NAMES:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *_exc: object) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def message(self) -> str:
        import signal
        assert self.signum is not None
        return f"pyvirt: stopped by {signal.Signals(self.signum).name}: the VM was shut down and its " \
               "temporary files removed\n"


def _run_vm(args: argparse.Namespace, make: Any, interactive: bool, cleanup: Any, fresh: bool = False,
            forward: Any = None) -> int:
    """Run the VM `make(console)` builds with the console on stdio, as `pyvirt run` does.

    Signals end it cleanly (_StopSignals); a guest that panics, or firmware that never
    starts the kernel (`fresh` boots), ends it with one line on stderr (vmm/watchdog.py)."""
    from pyvirt.vmm.console import open_console
    from pyvirt.vmm.watchdog import watch_run
    snapshot_after = _snapshot_after(args.snapshot_after)
    with open_console(interactive=interactive) as console, _StopSignals(forward) as stop:
        try:
            vm = make(console)
        except BaseException:
            cleanup()
            raise
        console.on_quit = vm.request_quit
        if getattr(args, "jail", False):
            _enter_jail(vm)
        watch = watch_run(vm, args.quiet, firmware=fresh)
        stop.vm = vm
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
            stop.vm = None
            watch.close()
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
    if stop.signum is not None:
        sys.stderr.write(stop.message())
        return 128 + stop.signum
    if watch.failure is not None:
        sys.stderr.write(f"pyvirt: error: {watch.failure}\n")
        return 1
    if snapshot_after is not None and vm.snapshots_taken:
        where = os.path.abspath(snapshot_after[1])
        sys.stderr.write(f"pyvirt: snapshot saved in {where}: `pyvirt run --restore {where}` goes on from it\n")
    if code is None and vm.reboot_requested:
        sys.stderr.write("pyvirt: the guest rebooted; a jailed run cannot build a new VM, so it ended "
                         "(run again, or without --jail)\n")
        return 0
    if code is None:
        if args.timeout and not vm.quit_requested:
            sys.stderr.write(f"pyvirt: --timeout {args.timeout:g}: the VM was stopped after "
                             f"{args.timeout:g} s (exit status 124)\n")
            return 124
        return 0
    if code and getattr(vm.board, "reset_reason", None) == 1:
        sys.stderr.write("pyvirt: error: the guest shut down reporting a system failure "
                         "(SBI system reset, reason 1)\n")
    return code


def _enter_jail(vm: Any) -> None:
    """`pyvirt run --jail`: confine this process now that the board is built (host/jail.py);
    which layers took effect goes to stderr with --stats-like brevity when one is off."""
    import json as _json

    from pyvirt.host import jail
    report = jail.apply(jail.run_jail(_json.loads(vm.spec.model_dump_json()), vm.board))
    vm.reset_in_place = False
    off = [f"{name} ({layer.get('reason')})" for name, layer in report.items() if not layer.get("on")]
    if off:
        sys.stderr.write(f"pyvirt: jail layers off: {'; '.join(off)}\n")


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
    from pyvirt.spec import format_size, parse_size
    if args.disk_cmd == "create":
        try:
            size = parse_size(args.size, default_unit="g") if args.size is not None else None
        except ConfigError:
            raise ConfigError(f"--size {args.size}: expected a size such as 8G, 1.5G or 512M") from None
        cs = args.cluster_size.strip()
        cluster_size = int(cs) if cs.isdigit() else parse_size(cs)    # a bare number: bytes
        create_qcow2(args.name, size, cluster_size=cluster_size,
                     backing=args.backing, backing_format=args.backing_format)
        made = describe_image(args.name)
        print(f"{args.name} created (qcow2, virtual size {format_size(made['virtual_size'])}"
              + (f", over {args.backing}" if args.backing else "") + ")")
        return 0
    if args.disk_cmd == "info":
        info = describe_image(args.name)
        if args.json:
            import dataclasses
            check = info.get("check")
            shown = info
            if dataclasses.is_dataclass(check) and not isinstance(check, type):
                shown = {**info, "check": dataclasses.asdict(check)}
            print(json.dumps(shown, indent=2, default=str))
        else:
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
        if args.json:
            print(json.dumps([{"name": n.name, "alive": n.alive, "ports": n.ports, "socket": str(n.socket),
                               "pid": n.pid, "created": n.created} for n in nets], indent=2))
            return 0
        width = max(4, *(len(n.name) for n in nets)) if nets else 4
        print(f"{'NAME':<{width}}  ALIVE  PORTS  SOCKET")
        for n in nets:
            ports = "-" if n.ports is None else str(n.ports)
            print(f"{n.name:<{width}}  {'yes' if n.alive else 'no':<5}  {ports:<5}  {n.socket}")
        return 0
    if args.network_cmd == "rm":
        remove_network(args.name)
        print(f"{args.name} removed")
        return 0
    raise ConfigError("pyvirt network needs an action: create, ls or rm")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
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
    except Stopped as e:
        import signal
        sys.stderr.write(f"pyvirt: stopped by {signal.Signals(e.signum).name}\n")
        return 128 + e.signum
    except KeyboardInterrupt:
        sys.stderr.write("pyvirt: interrupted\n")
        return 130
    except BrokenPipeError:
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
