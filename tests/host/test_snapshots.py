"""Snapshots through pyvirtd (a real daemon): take, restore, clone, delete, and their errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pyvirt.backends.disk import open_disk
from pyvirt.host.client import ApiError
from pyvirt.testing.daemon import COUNTER, Daemon, counts, wait_for

IDLE = "while true; do sleep 1; done"
MIB = 1 << 20


def error(call, *args, **kw) -> ApiError:   # noqa: ANN001
    with pytest.raises(ApiError) as e:
        call(*args, **kw)
    assert isinstance(e.value.detail, str) and e.value.detail and "\n" not in e.value.detail
    return e.value


def test_restore_goes_on_where_the_snapshot_was_taken(daemon: Daemon) -> None:
    c = daemon.client
    c.create("orig", memory="64M", command=COUNTER)
    c.start("orig")
    wait_for(lambda: "C=5 before" in c.logs("orig")["text"], 30, "the counter")

    running = c.snapshot("orig", "live")                  # of the running VM: it goes on
    assert c.inspect("orig")["state"] == "running"
    seen = max(counts(c.logs("orig")["text"]))
    wait_for(lambda: max(counts(c.logs("orig")["text"])) > seen + 2, 20, "the original to go on")
    assert running["vm"] == "orig" and running["memory"] == 64 * MIB and running["used_by"] == []
    assert Path(running["dir"]) == daemon.state / "snapshots" / "live"
    assert 0 < running["size"] < 64 * MIB                 # the RAM file is sparse

    c.pause("orig")
    s = c.snapshot("orig", "s1")                          # of the paused VM: it stays paused
    assert c.inspect("orig")["state"] == "paused"
    last = max(counts(c.logs("orig")["text"]))
    assert (Path(s["dir"]) / "manifest.json").is_file()
    c.kill("orig")
    c.delete("orig")

    vm = c.restore("s1", name="back")
    assert vm["state"] == "running" and vm["name"] == "back"
    text = wait_for(lambda: (t := c.logs("back")["text"]) and len(counts(t)) >= 3 and t, 30, "the restored counter")
    first = counts(text)[0]
    assert last < first <= last + 2, (last, text[:200])  # no reset, nothing lost
    assert counts(text) == list(range(first, first + len(counts(text))))
    assert f"C={first} before" in text                    # /tmp/f survived
    assert [x["name"] for x in c.snapshots()] == ["live", "s1"]
    assert c.snapshot_info("s1")["used_by"] == ["back"]

    e = error(c.delete_snapshot, "s1")                    # the VM runs from its files
    assert e.status == 409 and "back" in e.detail
    c.delete("back", force=True)
    c.delete_snapshot("s1")
    assert not Path(s["dir"]).exists()
    assert [x["name"] for x in c.snapshots()] == ["live"]

    out = daemon.cli("snapshots")
    assert out.returncode == 0 and re.search(r"^live\s+orig\s+64M", out.stdout, re.M), out.stdout
    out = daemon.cli("restore", "live", "--name", "again")
    assert out.returncode == 0 and out.stdout.split() == ["again", "running"], out
    wait_for(lambda: counts(c.logs("again")["text"]), 30, "the counter from the first snapshot")


def test_errors(daemon: Daemon) -> None:
    c = daemon.client
    for call in (c.snapshot_info, c.delete_snapshot, c.restore):
        assert error(call, "ghost").status == 404
    assert error(c.clone, "ghost", 2).status == 404
    assert error(c.snapshot, "novm", "s").status == 404
    c.create("v", memory="64M", command=IDLE)
    assert error(c.snapshot, "v", "s").status == 409        # not running
    c.start("v")
    assert error(c.snapshot, "v", "bad/name").status == 422
    c.snapshot("v", "good")
    assert error(c.snapshot, "v", "good").status == 409     # duplicate name
    bad = c.snapshot("v", "bad")
    manifest = Path(bad["dir"]) / "manifest.json"
    m = json.loads(manifest.read_text())
    m["version"] = 999
    manifest.write_text(json.dumps(m))
    vms = c.list()
    e = error(c.restore, "bad", name="nope")
    assert e.status == 422 and "999" in e.detail and "version 1" in e.detail, e.detail
    assert error(c.clone, "bad", 2).status == 422
    assert c.list() == vms and sorted(p.name for p in (daemon.state / "vms").iterdir()) == [vms[0]["id"]]
    out = daemon.cli("restore", "bad")
    assert out.returncode == 1 and out.stdout == "" and len(out.stderr.splitlines()) == 1, out
    assert "999" in out.stderr
    assert error(c.restore, "good", name="v").status == 409    # a VM of that name exists
    assert error(c.clone, "good", 0).status == 422
    assert error(c.clone, "good", 2, prefix="bad/p").status == 422
    c.create("good-2", memory="64M", command=IDLE)
    vms = c.list()
    assert error(c.clone, "good", 3).status == 409            # good-2 exists: none is made
    assert c.list() == vms


def ram_mapping(pid: int, ram: Path) -> dict[str, int]:
    """Rss and Pss (bytes) of the mapping of `ram` in process `pid`."""
    out: dict[str, int] = {}
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            current = line.endswith(str(ram))
        elif current and line.split(":")[0] in ("Rss", "Pss"):
            out[line.split(":")[0]] = out.get(line.split(":")[0], 0) + int(line.split()[1]) * 1024
    return out


def pss(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1)) * 1024


CLONE_CMD = """h0=$(hostname); w=0
head -c 1048576 /dev/urandom > /tmp/a; for i in $(seq 96); do cat /tmp/a; done > /tmp/fill; rm /tmp/a
while true; do
  h=$(hostname)
  if [ "$h" != "$h0" ] && [ $w = 0 ]; then
    w=1; echo "$h" | dd of=/dev/vda conv=notrunc 2>/dev/null; sync; dd if=/tmp/fill of=/dev/null bs=1M 2>/dev/null
  fi
  echo "H=$h M=$(cat /sys/class/net/eth0/address) D=$(head -c 16 /dev/vda | tr -d '\\000\\n')"
  sleep 0.3
done"""


def test_clones_have_their_own_identity_and_share_ram(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MIB))
    c.create("base", memory="256M", command=CLONE_CMD, disks=[str(disk)], nets=["user"])
    orig = c.start("base")
    wait_for(lambda: "H=base" in c.logs("base")["text"], 120, "the guest to fill its tmpfs: "
             + c.logs("base", tail=300)["text"])
    c.snapshot("base", "gold")
    clones = c.clone("gold", 4, prefix="web")
    assert [v["name"] for v in clones] == ["web-1", "web-2", "web-3", "web-4"]
    assert all(v["state"] == "running" for v in clones)
    assert c.inspect("base")["state"] == "running"

    def line(name: str) -> re.Match[str] | None:
        """The clone's identity once the guest agent has applied it (host name, then MAC)."""
        mac = c.inspect(name)["spec"]["nets"][0]["mac"]
        found = re.findall(rf"H={name} M=(\S+) D=(\S*)\n", c.logs(name)["text"])
        return found[-1] if found and found[-1][1] == name and found[-1][0] == mac else None

    seen = {v["name"]: wait_for(lambda n=v["name"]: line(n), 120, f"{v['name']}'s identity") for v in clones}
    macs = [m for m, _ in seen.values()]
    base_mac = orig["spec"]["nets"][0]["mac"]
    assert len(set(macs)) == 4 and base_mac not in macs, (macs, base_mac)
    for v in clones:                                   # the MAC the guest's eth0 has is the one we gave it
        assert seen[v["name"]][0] == c.inspect(v["name"])["spec"]["nets"][0]["mac"]
        vm_dir = Path(v["paths"]["dir"])
        assert all(Path(p["socket"]).parent == vm_dir for p in v["spec"]["ports"])

    # Memory: the clones share the snapshot's RAM file through the page cache.
    ram = Path(c.snapshot_info("gold")["dir"]) / "ram"
    pids = [c.inspect(v["name"])["pid"] for v in clones]
    maps = [ram_mapping(pid, ram) for pid in pids]
    total_pss = sum(pss(pid) for pid in pids)
    ram_rss = [m["Rss"] for m in maps]
    ram_pss = sum(m["Pss"] for m in maps)
    assert min(ram_rss) > 96 * MIB                     # each clone maps the filled RAM...
    assert ram_pss < 1.6 * max(ram_rss)                # ...but its clean pages are there once
    assert total_pss < 2 * 256 * MIB, (total_pss >> 20, ram_pss >> 20, [r >> 20 for r in ram_rss])

    # Disks: each clone wrote its name to its own overlay; the frozen image is untouched.
    for v in clones:
        c.kill(v["name"])
        overlay = Path(v["spec"]["disks"][0]["path"])
        assert overlay.parent.parent == Path(v["paths"]["dir"])
        d = open_disk(overlay, read_only=True, fmt="qcow2")
        buf = bytearray(16)
        d.readinto(0, memoryview(buf))
        d.close()
        assert bytes(buf).rstrip(b"\0") == f"{v['name']}\n".encode()
    assert disk.read_bytes() == bytes(MIB)
