"""Rate limits seen from the default guest: O_DIRECT reads of a disk limited in bytes/s or in
requests/s take about as long as the bucket says (and much longer than without a limit), and
a download over a NIC limited to a receive bandwidth is slowed the same way.  Times come from
the guest's /proc/uptime (the VM clock, which follows the host's)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pyvirt.testing.guest import GATEWAY, pyvirt

pytestmark = pytest.mark.slow
needs_passt = pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")
TIMED = "a=$(cut -d' ' -f1 /proc/uptime); {cmd} >/dev/null 2>&1 || exit 9; b=$(cut -d' ' -f1 /proc/uptime); " \
        "echo elapsed $a $b"


def guest_seconds(*args: str, cmd: str) -> float:
    r = pyvirt("run", *args, "--command", TIMED.format(cmd=cmd), timeout=300)
    assert r.code == 0, (r.out, r.err)
    line = [ln for ln in r.out.splitlines() if ln.startswith("elapsed ")][-1]
    a, b = map(float, line.split()[1:])
    return b - a


def test_disk_bandwidth_and_iops_limits(default_image, tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(1 << 20) * 6)
    dd = "dd if=/dev/vda of=/dev/null bs=64k count=64 iflag=direct"          # 4 MiB
    free = guest_seconds("--disk", str(img), cmd=dd)
    limited = guest_seconds("--disk", f"{img},bw=2M", cmd=dd)
    # 4 MiB at 2 MiB/s, less the bucket's 100 ms that is there at the start: ~1.9 s
    assert 1.5 < limited < 4.0, limited
    assert free < limited / 3, (free, limited)
    ops = guest_seconds("--disk", f"{img},iops=50", cmd="dd if=/dev/vda of=/dev/null bs=4k count=100 "
                        "iflag=direct")
    assert 1.5 < ops < 4.0, ops                      # 100 reads at 50/s, 5 of them at once


@needs_passt
def test_nic_receive_bandwidth_limit(default_image, host_server) -> None:  # noqa: F811
    www, port = host_server
    (www / "file").write_bytes(os.urandom(300_000))
    wget = f"wget -q -O /tmp/f http://{GATEWAY}:{port}/file"
    free = guest_seconds("--net", "user,host-loopback=on", cmd=wget)      # (the host's 127.0.0.1)
    limited = guest_seconds("--net", "user,host-loopback=on,rx_bw=100k", cmd=wget)
    # 300 kB at 100 KiB/s: ~2.9 s (beyond the pending bound frames wait in passt, TCP holds back)
    assert 2.0 < limited < 15.0, limited
    assert free < limited / 2, (free, limited)
