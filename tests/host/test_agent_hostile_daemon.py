"""A hostile guest agent behind pyvirtd (issue 16: "a hostile guest agent cannot crash the
VMM or the daemon, exhaust host memory or make pyvirt cp write outside the named
destination").  The guest's own agent is replaced by a program that answers every request
wrongly: a frame header announcing 2 GiB, a file longer than it announced, garbage frames,
and an exec whose output never ends while the client does not read.  Each request ends in
one line; pyvirtd's and the VMM's memory stay bounded; the copy writes nothing; the daemon
and the VM go on."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from pyvirt.host.agent import AgentError
from pyvirt.host.client import ApiError
from pyvirt.testing.asm import static_c, toolchain_missing
from pyvirt.testing.daemon import Daemon, wait_agent, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(toolchain_missing() is not None, reason="no riscv64 cross toolchain")]

HOSTILE_AGENT = r"""
#include <sys/socket.h>
#include <linux/vm_sockets.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

static void put(int s, int type, const void *p, uint32_t n) {
    unsigned char h[5] = {n, n >> 8, n >> 16, n >> 24, type};
    write(s, h, 5);
    if (n) write(s, p, n);
}

static int get(int s, unsigned char *buf, uint32_t cap) {      /* one request frame: its type */
    unsigned char h[5];
    if (read(s, h, 5) != 5) return -1;
    uint32_t n = h[0] | h[1] << 8 | h[2] << 16 | (uint32_t)h[3] << 24, got = 0;
    while (got < n && got < cap) { int r = read(s, buf + got, cap - got); if (r <= 0) break; got += r; }
    return h[4];
}

static void serve(int c) {
    static unsigned char buf[65536], junk[65536];
    memset(junk, 'j', sizeof junk);
    put(c, 'V', "pyvirt-agent 1", 14);
    switch (get(c, buf, sizeof buf)) {
    case 'L': {                                   /* a frame announcing 2 GiB */
        unsigned char h[5] = {0, 0, 0, 0x80, 'T'};
        write(c, h, 5);
        write(c, junk, sizeof junk);
        break;
    }
    case 'R': {                                   /* 10 bytes announced, megabytes sent */
        unsigned char meta[12] = {0xed, 0x09, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0};   /* mode 04755 */
        put(c, 'M', meta, 12);
        for (int i = 0; i < 64; i++) put(c, 'D', junk, sizeof junk);
        put(c, 'Z', 0, 0);
        break;
    }
    case 'E':                                     /* output without end */
        for (;;) put(c, '1', junk, sizeof junk);
    default:                                      /* garbage frames */
        for (int i = 0; i < 16; i++) put(c, '?', junk, 100);
    }
    sleep(1);
}

int main(void) {
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = 1024};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    while (bind(s, (struct sockaddr *)&a, sizeof a) < 0) usleep(100000);   /* the real agent's port */
    listen(s, 16);
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        if (fork() == 0) { serve(c); _exit(0); }
        close(c);
    }
}
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def one_line(e: BaseException) -> str:
    text = str(getattr(e, "detail", "") or e)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


def test_a_hostile_agent_cannot_hurt_the_daemon_or_the_host(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    c.create("vm", memory="256M", command="sleep 100000")
    c.start("vm")
    wait_agent(c, "vm")
    c.copy_to("vm", static_c(HOSTILE_AGENT), "/tmp/hostile", mode=0o755)
    # The hostile agent takes the port once the real one (and the exec serving this) is gone.
    with contextlib.suppress(AgentError):
        c.run("vm", ["sh", "-c", "setsid /tmp/hostile </dev/null >/dev/null 2>&1 & "
                                 "sleep 0.3; kill $(pidof pyvirt-agent)"])

    def hostile_answers() -> str | None:
        try:
            c.guest_ports("vm")
        except ApiError as e:
            return e.detail if "65536" in e.detail else None
        except AgentError:
            return None
        return None
    detail = wait_for(hostile_answers, 60, "the hostile agent", interval=0.5)
    assert "a frame of 2147483648 bytes" in detail and "\n" not in detail

    vmm = c.inspect("vm")["pid"]
    daemon_pid = daemon.proc.pid if daemon.proc else 0
    before = {"daemon": rss_kib(daemon_pid), "vmm": rss_kib(vmm)}

    # pyvirt cp: a file longer than announced writes nothing, anywhere.
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_bytes(b"old")
    r = daemon.cli("cp", "vm:/etc/passwd", str(dest / "keep"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(os.listdir(dest)) == ["keep"] and (dest / "keep").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["dest"]
    # Garbage frames for a copy into the guest: one line.
    src = tmp_path / "dest" / "keep"
    with pytest.raises(AgentError) as e:
        c.copy_to("vm", src, "/tmp/x")
    one_line(e.value)

    # An exec whose output never ends, read by nobody for a while: pyvirtd relays a frame at
    # a time, so its memory does not follow the guest's output.
    s = c.exec("vm", ["anything"])
    first = next(s.events())
    assert first.stream == 1 and len(first.data) == 65536
    time.sleep(8)
    grown = {"daemon": rss_kib(daemon_pid) - before["daemon"], "vmm": rss_kib(vmm) - before["vmm"]}
    n = 0
    for ev in s.events():                      # and it still flows when read
        n += len(ev.data)
        if n > 4 << 20:
            break
    s.close()
    print("RSS growth (KiB) while nobody read:", grown)
    assert grown["daemon"] < 48 * 1024 and grown["vmm"] < 48 * 1024, grown

    # The daemon and the VM are still there.
    assert c.inspect("vm")["state"] == "running" and c.inspect("vm")["pid"] == vmm
    assert [v["name"] for v in c.list()] == ["vm"]
