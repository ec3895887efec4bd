"""--net and --port: parsing into NetSpecs, and one clear message for every mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvirt.errors import ConfigError
from pyvirt.request import _nets
from pyvirt.spec import NetSpec, make_spec, random_mac


def test_net_forms() -> None:
    u = NetSpec.parse("user,port=8080:80,port=2222:22,mac=52:54:00:AA:bb:cc")
    assert (u.backend, u.ports, u.mac) == ("user", [(8080, 80), (2222, 22)], "52:54:00:aa:bb:cc")
    s = NetSpec.parse("stream=/run/net.sock")
    assert (s.backend, s.socket) == ("stream", Path("/run/net.sock"))
    t = NetSpec.parse("tap=tap0,mac=02:00:00:00:00:01")
    assert (t.backend, t.ifname, t.mac) == ("tap", "tap0", "02:00:00:00:00:01")


def test_default_macs_are_random_and_local() -> None:
    macs = {random_mac() for _ in range(20)}
    assert len(macs) > 1
    assert all(re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", m) for m in macs)
    assert NetSpec.parse("user").mac.startswith("52:54:00:")


@pytest.mark.parametrize("text, message", [
    ("", "expected user"),
    ("user=x", "expected user"),
    ("stream", "expected user"),
    ("tap=", "expected user"),
    ("vde=/x", "expected user"),
    ("user,port=80", "expected HOST:GUEST"),
    ("user,port=70000:80", "expected HOST:GUEST"),
    ("user,port=a:b", "expected HOST:GUEST"),
    ("stream=/x,port=1:2", "unknown network option 'port=1:2'"),
    ("user,speed=10", "unknown network option 'speed=10'"),
    ("user,mac=52:54:00:12:34", "invalid MAC address"),
    ("user,mac=53:54:00:12:34:56", "multicast"),
])
def test_bad_net(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NetSpec.parse(text)


def test_port_implies_user_network() -> None:
    nets = _nets([], ["8080:80", "2222:22"])
    assert len(nets) == 1 and nets[0].backend == "user" and nets[0].ports == [(8080, 80), (2222, 22)]
    nets = _nets(["stream=/x", "user"], ["8080:80"])
    assert nets[0].ports == [] and nets[1].ports == [(8080, 80)]
    assert _nets([], []) == []
    with pytest.raises(ConfigError, match="--port needs a user network"):
        _nets(["tap=tap0"], ["8080:80"])


def test_host_port_forwarded_once() -> None:
    with pytest.raises(ConfigError, match="a host port can be forwarded only once"):
        make_spec(nets=_nets(["user,port=8080:80"], ["8080:81"]))


def test_host_loopback_is_off_unless_asked_for() -> None:
    """Issue 14, item 4: the guest reaches the host's 127.0.0.1 only with host-loopback=on."""
    assert NetSpec.parse("user").host_loopback is False
    assert NetSpec.parse("user,host-loopback=on,port=8080:80").host_loopback is True
    assert NetSpec.parse("user,host-loopback=off").host_loopback is False
    assert NetSpec.model_validate({"backend": "user"}).host_loopback is False     # older specs, snapshots
    with pytest.raises(ConfigError, match="host-loopback is on or off"):
        NetSpec.parse("user,host-loopback=yes")
    with pytest.raises(ConfigError, match="unknown network option"):
        NetSpec.parse("stream=/tmp/s,host-loopback=on")
