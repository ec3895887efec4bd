"""The initramfs layout, the /init script, the cache and the progress display."""

from __future__ import annotations

import io
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pyvirt.errors import BuildError
from pyvirt.images import cache, cached_default_image, default_image, initramfs
from pyvirt.images.cpio import read_newc
from pyvirt.images.initramfs import init_script, make_initramfs
from pyvirt.images.progress import PlainProgress, Progress, RichProgress, make_progress

APPLETS = ["bin/sh", "bin/mount", "usr/bin/base64", "sbin/poweroff", "bin/busybox", "usr/sbin/devmem"]


def test_layout() -> None:
    data = make_initramfs(b"BUSYBOX", APPLETS, b"#!/bin/sh\n")
    entries = {e.name: e for e in read_newc(data)}
    assert entries["bin/busybox"].data == b"BUSYBOX" and entries["bin/busybox"].mode & 0o777 == 0o755
    assert entries["init"].data == b"#!/bin/sh\n" and entries["init"].mode == stat.S_IFREG | 0o755
    for path in APPLETS[:-2] + ["usr/sbin/devmem"]:
        assert stat.S_ISLNK(entries[path].mode) and entries[path].data == b"/bin/busybox", path
    assert entries["dev/console"].rdev == (5, 1) and stat.S_ISCHR(entries["dev/console"].mode)
    assert entries["dev/null"].rdev == (1, 3)
    for d in ("proc", "sys", "dev", "tmp", "root", "mnt"):
        assert stat.S_ISDIR(entries[d].mode), d
    assert sum(1 for e in entries.values() if e.uid or e.gid) == 0


def test_init_script_contract() -> None:
    text = init_script().decode()
    assert text.startswith("#!/bin/sh\n")
    for needle in ("mount -t proc proc /proc", "mount -t sysfs sysfs /sys", "mount -t devtmpfs devtmpfs /dev",
                   "name=pyvirt", "pyvirt.hostname=", 'hostname "$name"', "HOME=/root", "stty -onlcr", "pyvirt.cmd=", "base64 -d", "</dev/null", "sync",
                   "devmem 0x100000 32", "0x5555", "(rc << 16) | 0x3333", "poweroff -f",
                   "PS1='root@\\h:\\w# '", "setsid cttyhack sh"):
        assert needle in text, needle
    if shutil.which("sh"):
        subprocess.run(["sh", "-n"], input=text.encode(), check=True)


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYVIRT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.cache_root() == Path.home() / ".cache" / "pyvirt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "pyvirt"
    monkeypatch.setenv("PYVIRT_CACHE", str(tmp_path / "own"))
    assert cache.cache_root() == tmp_path / "own"


def test_building_is_atomic(tmp_path: Path) -> None:
    final = tmp_path / "artifact-1"
    with pytest.raises(RuntimeError), cache.building(final) as out:
        (out / "half").write_text("half written")
        raise RuntimeError("interrupted")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with cache.building(final) as out:
        (out / "whole").write_text("done")
        assert not final.exists()
    assert (final / "whole").read_text() == "done" and list(tmp_path.iterdir()) == [final]
    with cache.building(final) as out:          # someone finished first: theirs stays
        (out / "whole").write_text("second")
    assert (final / "whole").read_text() == "done" and list(tmp_path.iterdir()) == [final]
    cache.write_atomic(tmp_path / "f", b"data")
    assert (tmp_path / "f").read_bytes() == b"data" and len(list(tmp_path.iterdir())) == 2
    assert cache.key("ab", "c") != cache.key("a", "bc")


def test_empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYVIRT_CACHE", str(tmp_path))
    assert cached_default_image() is None
    with pytest.raises(BuildError, match="pyvirt image build"):
        default_image(build=False)


def test_cached_initramfs_only_for_the_current_init(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYVIRT_CACHE", str(tmp_path))
    sha = "d" * 64
    d = initramfs.initramfs_dir(sha)
    d.mkdir(parents=True)
    (d / "initramfs.cpio").write_bytes(b"x")
    assert initramfs.cached_initramfs() is None                  # no manifest: not trusted
    (d / "manifest.json").write_text(json.dumps({"busybox_sha256": sha, "built": "2026"}))
    assert initramfs.cached_initramfs() == d / "initramfs.cpio"
    monkeypatch.setattr(initramfs, "init_script", lambda: b"#!/bin/sh\n# another init\n")
    assert initramfs.cached_initramfs() is None
    (tmp_path / "initramfs-bogus").mkdir()
    (tmp_path / "initramfs-bogus" / "manifest.json").write_text("{not json")
    assert initramfs.cached_initramfs() is None


def test_plain_progress_lines() -> None:
    out = io.StringIO()
    with make_progress(True, out) as p:                  # not a terminal: plain lines
        assert isinstance(p, PlainProgress)
        p.step("compiling the kernel")
        p.update("compiling the kernel", 10, 700, "files")
        p.note("kernel built")
    assert out.getvalue() == "pyvirt: compiling the kernel...\npyvirt: kernel built\n"
    Progress().update("x", 1, 2)                           # the silent one says nothing


def test_rich_progress_draws() -> None:
    out = io.StringIO()
    with RichProgress(out) as p:
        p.step("downloading")
        p.update("Packages.xz", 1 << 20, 4 << 20)
        p.update("Packages.xz", 4 << 20, 4 << 20)
        p.update("compiling the kernel", 5, None, "files")
        p.note("done")
    assert "pyvirt: downloading..." in out.getvalue() and "pyvirt: done" in out.getvalue()


def test_built_initramfs_contents() -> None:
    """The cached initramfs (if built): riscv64 static busybox, every applet, our /init."""
    cpio = initramfs.cached_initramfs()
    if cpio is None:
        pytest.skip("the default initramfs is not built (pyvirt image build)")
    entries = {e.name: e for e in read_newc(cpio.read_bytes())}
    busybox = entries["bin/busybox"].data
    assert busybox[:4] == b"\x7fELF" and int.from_bytes(busybox[18:20], "little") == 243   # EM_RISCV
    assert entries["init"].data == init_script()
    links = {name.rsplit("/", 1)[-1] for name, e in entries.items() if stat.S_ISLNK(e.mode)}
    for applet in ("sh", "mount", "umount", "devmem", "poweroff", "cat", "echo", "uname", "ls", "mkdir",
                   "dd", "sync", "mke2fs", "cttyhack", "setsid", "base64", "sleep", "hostname", "ip"):
        assert applet in links, applet
    manifest = json.loads((cpio.parent / "manifest.json").read_text())
    assert manifest["busybox_package"] == "busybox-static" and len(manifest["busybox_sha256"]) == 64
