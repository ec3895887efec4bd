"""The Vm run-loop hook the runner uses: watched descriptors served between slices, pause with
the VM clock stopped and no CPU used, resume, quit from a callback."""

from __future__ import annotations

import os
import resource
import threading
import time

import pytest

from pyvirt.backends.char import BufferBackend
from pyvirt.guestcmd import command_append
from pyvirt.images import cached_default_image
from pyvirt.spec import make_spec
from pyvirt.testing import stretch
from pyvirt.vmm.vm import Vm, Watch

pytestmark = pytest.mark.slow


def test_watch_pause_resume_quit() -> None:
    img = cached_default_image()
    if img is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    spec = make_spec(memory=64 << 20, kernel=img.kernel, initrd=img.initrd,
                     append=command_append(img.cmdline, "while :; do echo tick; sleep 0.1; done"))
    console = BufferBackend()
    vm = Vm(spec, console)
    r, w = os.pipe()
    ticks = []
    log: list[tuple[str, int, float, int]] = []     # (event, VM clock, CPU seconds, output bytes)

    def cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_THREAD)
        return u.ru_utime + u.ru_stime

    def on_ready(fds: list[int]) -> None:
        assert fds == [r]
        cmd = os.read(r, 1)
        log.append((cmd.decode(), vm.board.clock.ticks(), cpu(), len(console.output)))
        {b"p": vm.pause, b"r": vm.resume, b"q": vm.request_quit}[cmd]()

    vm.watches.append(Watch(lambda: [r], on_ready, on_tick=lambda: ticks.append(1)))

    def driver() -> None:
        deadline = time.monotonic() + stretch(30)
        while b"tick" not in console.output and time.monotonic() < deadline:
            time.sleep(0.05)
        for cmd, after in ((b"p", 0.5), (b"r", 2.0), (b"q", 1.0)):     # 2 s paused
            time.sleep(after)
            os.write(w, cmd)

    t = threading.Thread(target=driver)
    t.start()
    try:
        code = vm.run(timeout=60)
    finally:
        t.join()
        vm.close()
        os.close(r)
        os.close(w)
    assert code is None and vm.quit_requested and not vm.paused
    events = [e[0] for e in log]
    assert events == ["p", "r", "q"], events
    (_, clock_p, cpu_p, out_p), (_, clock_r, cpu_r, out_r), (_, clock_q, _, out_q) = log
    hz = vm.board.clock.hz
    assert (clock_r - clock_p) / hz < 0.2         # 2 s paused: the VM clock hardly moved
    assert cpu_r - cpu_p < 0.1                    # ...and the loop used no CPU
    assert out_r == out_p                         # ...and the guest printed nothing
    assert (clock_q - clock_r) / hz > 0.5 and out_q > out_r    # it went on after resume
    assert ticks
