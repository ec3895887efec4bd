"""The `pyvirt` commands that reach into a running pyvirtd VM through its guest agent:

    pyvirt exec VM [-t] [-i] -- CMD...    run CMD; its stdout and stderr apart (merged with -t),
                                          exit status the command's (128+N for signal N)
    pyvirt shell VM                       an interactive login shell (-t -i)
    pyvirt cp VM:PATH LOCAL | LOCAL VM:PATH   copy a file out of or into the guest
    pyvirt port VM [ADDR:]HOST:GUEST      forward host TCP port HOST (on 127.0.0.1) to the
                                          guest's port GUEST until interrupted
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import termios
import threading
import tty
from typing import Any

from pyvirt.errors import ConfigError
from pyvirt.host.agent import AgentError

COMMANDS = ("exec", "shell", "cp", "port")
SHELL = ["/bin/sh", "-c", "if [ -x /bin/bash ]; then exec /bin/bash -l; else exec /bin/sh -l; fi"]


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    e = sub.add_parser("exec", parents=[common], help="run a command in a running VM (through its agent)")
    e.add_argument("name", metavar="VM")
    e.add_argument("-t", "--tty", action="store_true", help="on a terminal in the guest (this terminal's size)")
    e.add_argument("-i", "--interactive", action="store_true", help="pass this process's stdin to the command")
    e.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    sh = sub.add_parser("shell", parents=[common], help="an interactive shell in a running VM")
    sh.add_argument("name", metavar="VM")
    cp = sub.add_parser("cp", parents=[common], help="copy a file out of (VM:PATH LOCAL) or into (LOCAL VM:PATH) "
                                                     "a running VM")
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dest", metavar="DEST")
    p = sub.add_parser("port", parents=[common], help="forward a host TCP port to a port in a running VM "
                                                      "(until interrupted)")
    p.add_argument("name", metavar="VM")
    p.add_argument("spec", metavar="HOST:GUEST")


def run(args: argparse.Namespace, client: Any) -> int:
    try:
        if args.cmd == "exec":
            argv = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not argv:
                raise ConfigError("pyvirt exec VM [-t] [-i] -- CMD...: no command given")
            return _exec(client, args.name, argv, args.tty, args.interactive)
        if args.cmd == "shell":
            return _exec(client, args.name, SHELL, True, True)
        if args.cmd == "cp":
            return _cp(client, args.src, args.dest)
        return _port(client, args.name, args.spec)
    except AgentError as e:
        raise ConfigError(str(e)) from None


def _exec(client: Any, name: str, argv: list[str], use_tty: bool, interactive: bool) -> int:
    size = (24, 80)
    if use_tty and os.isatty(1):
        cols, rows = os.get_terminal_size(1)
        size = (rows, cols)
    s = client.exec(name, argv, tty=use_tty, stdin=interactive, size=size)
    saved = None
    if use_tty and interactive and os.isatty(0):
        saved = termios.tcgetattr(0)
        tty.setraw(0)
    old_winch = None
    if use_tty and os.isatty(1):
        def winch(*_: Any) -> None:
            c, r = os.get_terminal_size(1)
            with contextlib.suppress(AgentError):
                s.resize(r, c)
        old_winch = signal.signal(signal.SIGWINCH, winch)
    if interactive:
        def pump() -> None:
            with contextlib.suppress(AgentError, OSError):
                while data := os.read(0, 65536):
                    s.write(data)
                s.close_stdin()
        threading.Thread(target=pump, daemon=True).start()
    try:
        for ev in s.events():
            if ev.stream:
                os.write(ev.stream, ev.data)
        assert s.result is not None
        return s.result.status
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        s.close()


def _split(arg: str) -> tuple[str, str] | None:
    """'VM:PATH' -> (VM, PATH); a local path (no colon before the first slash) -> None."""
    head, sep, tail = arg.partition(":")
    if sep and head and "/" not in head:
        return head, tail
    return None


def _cp(client: Any, src: str, dest: str) -> int:
    s, d = _split(src), _split(dest)
    if (s is None) == (d is None):
        raise ConfigError("pyvirt cp: give one side as VM:PATH and the other as a local path")
    if s is not None:
        vm, path = s
        n = client.copy_from(vm, path, dest)
        print(f"{vm}:{path} -> {dest} ({n} bytes)", file=sys.stderr)
    else:
        assert d is not None
        vm, path = d
        n = client.copy_to(vm, src, path)
        print(f"{src} -> {vm}:{path} ({n} bytes)", file=sys.stderr)
    return 0


ACCEPT_WAKEUP = 0.5              # seconds: how soon `pyvirt port` notices a signal another thread took


def _port(client: Any, name: str, spec: str) -> int:
    host, sep, guest = spec.rpartition(":")
    try:
        hport, gport = int(host.rpartition(":")[2]), int(guest)
        if not sep or not (0 < hport < 65536 and 0 < gport < 65536):
            raise ValueError
    except ValueError:
        raise ConfigError(f"pyvirt port {spec}: expected HOST:GUEST with TCP ports 1..65535") from None
    client.inspect(name)                                 # the VM exists (one clear error if not)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind(("127.0.0.1", hport))
    except OSError as e:
        raise ConfigError(f"cannot listen on 127.0.0.1:{hport}: {e.strerror}") from None
    srv.listen(64)
    # Ctrl-C sets a flag and accept() wakes up twice a second to look at it.  A SIGINT the
    # kernel hands to a forwarding thread only makes the main thread run the handler at
    # its next bytecode, which a main thread blocked in accept() for good never reaches (a
    # Ctrl-C that did nothing, seen in a test run); and a KeyboardInterrupt raised there,
    # at the loop's back edge, escapes an enclosing try on CPython 3.11.
    stop = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: stop.set())
    srv.settimeout(ACCEPT_WAKEUP)
    print(f"forwarding 127.0.0.1:{hport} -> {name}:{gport} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except socket.timeout:                   # (EINTR is retried: PEP 475)
                c = None
            if c is not None:
                c.settimeout(None)
                threading.Thread(target=_forward, args=(client, name, gport, c), daemon=True).start()
        return 0
    finally:
        signal.signal(signal.SIGINT, old)
        srv.close()


def _forward(client: Any, name: str, port: int, c: socket.socket) -> None:
    from websockets.exceptions import ConnectionClosed
    try:
        ws = client.tcp(name, port)
    except AgentError as e:
        print(f"pyvirt port: {e}", file=sys.stderr)
        c.close()
        return

    def up() -> None:
        with contextlib.suppress(OSError, ConnectionClosed):
            while data := c.recv(65536):
                ws.send(data)
        with contextlib.suppress(Exception):
            ws.close()

    threading.Thread(target=up, daemon=True).start()
    with contextlib.suppress(OSError, ConnectionClosed):
        for msg in ws:
            if isinstance(msg, bytes):
                c.sendall(msg)
    c.close()
