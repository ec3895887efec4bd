"""--share HOSTDIR:TAG[,ro]: parsed into the spec, refused with one line when wrong, and the
kernel arguments that mount it (the default guest's /init, Debian's systemd)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirt.errors import ConfigError
from pyvirt.request import request, resolve, share_append
from pyvirt.spec import ShareSpec, make_spec


def test_parse() -> None:
    sh = ShareSpec.parse("/a:b/dir:work,ro")
    assert (sh.path, sh.tag, sh.read_only) == (Path("/a:b/dir"), "work", True)
    assert ShareSpec.parse("/x:t").read_only is False


@pytest.mark.parametrize("text, words", [
    ("/x", "expected HOSTDIR:TAG"), (":t", "expected HOSTDIR:TAG"), ("/x:t,rx", "unknown share option"),
    ("/x:a/b", "a tag is"), ("/x:" + "t" * 37, "a tag is"), ("/x:", "a tag is"),
])
def test_bad_shares_are_one_line(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ShareSpec.parse(text)


def test_tags_are_unique_and_dirs_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--share: share tags must be unique"):
        make_spec(shares=[ShareSpec(path=tmp_path, tag="t"), ShareSpec(path=tmp_path, tag="t")])
    with pytest.raises(ConfigError, match="no such directory"):
        resolve(request(kernel=str(tmp_path / "k"), shares=[f"{tmp_path}/missing:t"]))


def test_resolve_mounts_it(tmp_path: Path) -> None:
    r = resolve(request(kernel=str(tmp_path / "k"), append="console=ttyS0", shares=[f"{tmp_path}:work,ro"]))
    assert r.spec.shares == [ShareSpec(path=tmp_path, tag="work", read_only=True)]
    assert r.spec.append == "console=ttyS0 pyvirt.share=work:ro"
    sh = [ShareSpec(path=tmp_path, tag="w")]
    assert share_append("q", sh, debian=True) == "q systemd.mount-extra=w:/mnt/w:virtiofs:rw,nofail"
