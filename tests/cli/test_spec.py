"""The VM specification validates user input into one clear message."""

from __future__ import annotations

import pytest

from pyvirt.errors import ConfigError
from pyvirt.spec import DiskSpec, make_spec, parse_size


@pytest.mark.parametrize("text, size", [("256M", 256 << 20), ("1G", 1 << 30), ("512", 512 << 20),
                                        ("64MiB", 64 << 20), ("2g", 2 << 30)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "12Q", "-5M"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid size"):
        parse_size(text)


def test_disk_options() -> None:
    assert DiskSpec.parse("a.img,ro").read_only
    assert not DiskSpec.parse("a.img").read_only
    with pytest.raises(ConfigError, match="unknown disk option 'rx'"):
        DiskSpec.parse("a.img,rx")
    assert DiskSpec.parse("a.img").format == "auto"
    d = DiskSpec.parse("a.qcow2,ro,format=qcow2")
    assert d.read_only and d.format == "qcow2"
    assert DiskSpec.parse("a.img,format=raw").format == "raw"
    with pytest.raises(ConfigError, match="unknown disk option 'format=vmdk'"):
        DiskSpec.parse("a.img,format=vmdk")


@pytest.mark.parametrize("fields, message", [
    ({"cpus": 0}, "--cpus 0: at least 1"),
    ({"cpus": 9}, "--cpus 9: at most 8"),
    ({"memory": 1 << 20}, "--memory 1M: at least 16M"),
    ({"memory": (256 << 20) + 4096}, "multiple of 2 MiB"),
    ({"engine": "warp"}, "--engine warp: "),
    ({"flux": 1}, "unknown setting 'flux'"),
])
def test_bad_specs(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_spec(**fields)


def test_engine_default_follows_pyvirt_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvirt.engines import native_available
    monkeypatch.delenv("PYVIRT_ENGINE", raising=False)
    assert make_spec().engine == ("native" if native_available() else "jit")
    for name in ("interp", "jit"):
        monkeypatch.setenv("PYVIRT_ENGINE", name)
        assert make_spec().engine == name
        assert make_spec(engine="native" if name == "jit" else "jit").engine != name   # named wins


def test_bad_pyvirt_engine_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVIRT_ENGINE", "turbo")
    with pytest.raises(ConfigError, match="PYVIRT_ENGINE='turbo' is not an engine"):
        make_spec()
