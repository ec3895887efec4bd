"""Layer application (pyvirt.oci.unpack) against the busybox test image's layers and against
umoci, Debian's reference implementation; hostile layers refused in one line."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from pyvirt.oci import BlobStore, OciError, resolve_image
from pyvirt.oci import unpack as unpack_mod
from pyvirt.oci.unpack import apply_layers
from pyvirt.testing import oci as t


def _unpacked(tmp: Path, layers: list[bytes], config: dict | None = None) -> Path:
    layout = tmp / "img"
    t.write_layout(layout, config or t.image_config(layers, **t.BUSYBOX_CONFIG), layers)
    img = resolve_image(str(layout))
    root = tmp / "root"
    root.mkdir()
    apply_layers(root, BlobStore(), img.layers, img.diff_ids)
    return root


def _tree(root: Path) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, content or link target, xattrs, hard link group)."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                body = ""
            names = [] if stat.S_ISLNK(st.st_mode) else sorted(os.listxattr(p, follow_symlinks=False))
            xattrs = tuple((k, os.getxattr(p, k, follow_symlinks=False)) for k in names)
            group = inodes.setdefault(st.st_ino, rel) if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 else ""
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, body, xattrs, group)
    return out


def test_whiteouts_opaque_dirs_links_modes_and_xattrs(tmp_path, oci_cache, busybox_layers) -> None:
    root = _unpacked(tmp_path, busybox_layers)
    assert not (root / "gone").exists()                       # .wh.gone
    assert sorted(os.listdir(root / "opaque")) == ["new"]     # .wh..wh..opq hid old and sub
    f, hard, hard2 = (os.lstat(root / "data" / n) for n in ("file", "hard", "hard2"))
    assert f.st_ino == hard.st_ino == hard2.st_ino and f.st_nlink == 3
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (1000, 50, 0o640)
    assert os.readlink(root / "data" / "link") == "../etc/passwd"
    assert stat.S_IMODE(os.lstat(root / "data" / "suid").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(root / "data" / "sgid").st_mode) == 0o2711
    assert stat.S_IMODE(os.lstat(root / "data" / "sticky").st_mode) == 0o1777
    assert os.getxattr(root / "data" / "attr", "user.pyvirt") == b"yes"
    assert (root / "etc" / "motd").read_bytes() == b"third layer\n"
    assert os.lstat(root / "home" / "app").st_uid == 1000


def _replacements() -> list[bytes]:
    """Layers replacing things with other things: a directory by a file and back, a symlink by
    a directory, a whiteout of a whole directory, an opaque directory two levels down, a hard
    link across layers, a file's mode and owner changed by a later layer."""
    return [
        t.layer([("a", "dir"), ("a/x", "file", b"x"), ("b", "file", b"b"), ("c", "symlink", "a"),
                 ("d", "dir"), ("d/e", "dir"), ("d/e/f", "file", b"f"), ("d/e/g", "file", b"g"),
                 ("w", "dir"), ("w/1", "file", b"1"), ("m", "file", b"m", 0o600, 5, 6)]),
        t.layer([("a", "file", b"now a file"), ("b", "dir", 0o700, 7, 8), ("b/y", "file", b"y"),
                 (".wh.c", "whiteout"), ("c", "dir", 0o711), ("d/e/.wh..wh..opq", "whiteout"),
                 ("d/e/h", "file", b"h"), (".wh.w", "whiteout"), ("m", "file", b"m2", 0o4750, 9, 10),
                 ("h1", "hardlink", "d/e/h")]),
        t.layer([("a", "dir", 0o751), ("a/z", "file", b"z"), ("h2", "hardlink", "h1"),
                 ("b/.wh.y", "whiteout"), ("ln", "symlink", "/absolute/target")]),
    ]


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed (scripts/setup-system.sh)")
@pytest.mark.parametrize("which", ["busybox", "replacements"])
def test_the_same_tree_as_umoci(tmp_path, oci_cache, busybox_layers, which) -> None:
    """The same files, types, modes, owners, contents, link targets, xattrs and hard links as
    `umoci unpack` of the same layout (run as root, as the conversion is)."""
    if os.geteuid() != 0:
        pytest.skip("umoci keeps ownership only as root")
    layers = busybox_layers if which == "busybox" else _replacements()
    ours = _unpacked(tmp_path, layers, None if which == "busybox" else t.image_config(layers, Cmd=["sh"]))
    if which == "replacements":
        assert sorted(os.listdir(ours / "a")) == ["z"] and sorted(os.listdir(ours / "d" / "e")) == ["h"]
        assert not (ours / "w").exists() and os.listdir(ours / "b") == [] and (ours / "c").is_dir()
        assert os.lstat(ours / "h2").st_nlink == 3 and stat.S_IMODE(os.lstat(ours / "m").st_mode) == 0o4750
    bundle = tmp_path / "bundle"
    p = subprocess.run(["umoci", "unpack", "--image", f"{tmp_path / 'img'}:latest", str(bundle)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    theirs, mine = _tree(bundle / "rootfs"), _tree(ours)
    assert set(theirs) == set(mine)
    diff = {p: (mine[p], theirs[p]) for p in mine if mine[p] != theirs[p]}
    assert not diff


def _layer_image(tmp_path: Path, *layers: bytes) -> str:
    layout = tmp_path / "hostile"
    t.write_layout(layout, t.image_config(list(layers), Cmd=["sh"]), list(layers))
    return str(layout)


def _refused(tmp_path: Path, layers: list[bytes], match: str, limit: int | None = None) -> str:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    img = resolve_image(_layer_image(tmp_path, *layers))
    root = tmp_path / "root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    with pytest.raises(OciError, match=match) as e:
        apply_layers(root, BlobStore(), img.layers, img.diff_ids, limit)
    assert "\n" not in str(e.value)
    assert os.listdir(outside) == []
    return str(e.value)


def test_parent_paths_and_absolute_paths_are_refused(tmp_path, oci_cache) -> None:
    _refused(tmp_path, [t.layer([("../outside/evil", "file", b"x")])], r"leaves the root \(\.\.\), refused")
    _refused(tmp_path, [t.layer([(f"{tmp_path}/outside/evil", "file", b"x")])], "absolute path .* refused")
    _refused(tmp_path, [t.layer([("a", "dir"), ("a/../../outside/evil", "file", b"x")])], "leaves the root")


def test_a_symlink_out_then_a_file_through_it_is_refused(tmp_path, oci_cache) -> None:
    out = str(tmp_path / "outside")
    _refused(tmp_path, [t.layer([("out", "symlink", out), ("out/evil", "file", b"x")])],
             "goes through the symlink out, refused")
    # across layers, and through a relative link climbing out
    _refused(tmp_path, [t.layer([("up", "symlink", "../../outside")]), t.layer([("up/evil", "file", b"x")])],
             "goes through the symlink up, refused")
    # a hard link to a file outside the root through a symlink
    _refused(tmp_path, [t.layer([("out", "symlink", out), ("h", "hardlink", "out/x")])],
             "goes through the symlink out")


def test_a_directory_replaced_by_a_symlink_does_not_carry_its_mode_out(tmp_path, oci_cache) -> None:
    """Directory modes are set after a layer's members (a 0555 directory still takes its
    files); a later member that turned the directory, or one above it, into a symlink to a
    host directory must not make that last step chmod/chown/utime the host directory.
    (A fuzzing run did exactly this to the build machine's "/", mode 000.)"""
    victim = tmp_path / "victim"
    (victim / "b").mkdir(parents=True)
    os.chmod(victim, 0o751)
    os.chmod(victim / "b", 0o751)
    before = {p: os.stat(p) for p in (victim, victim / "b")}
    layers = [
        t.layer([("x", "dir", 0o000), ("x", "symlink", str(victim))]),                   # the dir itself
        t.layer([("a", "dir"), ("a/b", "dir", 0o000), ("a", "symlink", str(victim))]),    # a dir above it
        t.layer([("w", "dir", 0o000), (".wh.w", "whiteout"), ("w", "symlink", str(victim))]),
    ]
    for lay in layers:
        root = tmp_path / "root"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        img = resolve_image(_layer_image(tmp_path, lay))
        apply_layers(root, BlobStore(), img.layers, img.diff_ids)
        for p, st in before.items():
            now = os.stat(p)
            assert (now.st_mode, now.st_uid, now.st_mtime_ns) == (st.st_mode, st.st_uid, st.st_mtime_ns), p
    # and a directory that stays a directory still gets its mode, last
    root = _unpacked(tmp_path / "ok", [t.layer([("d", "dir", 0o555), ("d/f", "file", b"x")])])
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o555 and (root / "d/f").read_bytes() == b"x"


def test_a_decompression_bomb_stops_at_the_limit_with_memory_bounded(tmp_path, oci_cache) -> None:
    bomb = t.layer([("zeros", "file", bytes(64 << 20))])
    layout = tmp_path / "bomb"
    t.write_layout(layout, t.image_config([bomb], Cmd=["sh"]), [bomb])
    img = resolve_image(str(layout))
    assert os.path.getsize(BlobStore().path(img.layers[0])) < 1 << 20       # 64 MiB in under 1 MiB
    root = tmp_path / "root"
    root.mkdir()
    tracemalloc.start()
    with pytest.raises(OciError, match="unpacks to more than 16777216 bytes .*decompression bomb.*refused"):
        apply_layers(root, BlobStore(), img.layers, img.diff_ids, 16 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20
    assert os.path.getsize(root / "zeros") <= 16 << 20


def test_a_layer_that_does_not_match_its_diff_id_is_refused(tmp_path, oci_cache) -> None:
    good, other = t.layer([("a", "file", b"a")]), t.layer([("b", "file", b"b")])
    config = t.image_config([other], Cmd=["sh"])
    t.write_layout(tmp_path / "img", config, [good])
    img = resolve_image(str(tmp_path / "img"))
    (tmp_path / "root").mkdir()
    with pytest.raises(OciError, match="does not match the config's diff_id"):
        apply_layers(tmp_path / "root", BlobStore(), img.layers, img.diff_ids)


def test_malformed_tars_are_one_line(tmp_path, oci_cache) -> None:
    data = bytearray(t.layer([("a", "file", b"a")]))
    data[148:156] = b"0000000\0"                                    # checksum
    _refused(tmp_path, [bytes(data)], "checksum is wrong")
    huge_pax = b"%d path=%s\n" % (len("path=") + (2 << 20) + 10, b"a" * (2 << 20))
    head = bytearray(512)
    head[:9] = b"PaxHeader"
    head[124:136] = b"%011o\0" % len(huge_pax)
    head[156:157] = b"x"
    head[148:156] = b"        "
    head[148:156] = b"%06o\0 " % sum(head)
    _refused(tmp_path, [bytes(head) + huge_pax + bytes(-len(huge_pax) % 512 + 1024)], "larger than 1048576 bytes")


def _pax_layer(name: str, pax: dict[str, str], **fields: int) -> bytes:
    """One member with the PAX records and header numbers given (tarfile writes them; without
    PAX records in GNU format, whose numbers may be base-256)."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT) as tar:
        ti = tarfile.TarInfo(name)
        ti.pax_headers = pax
        for k, v in fields.items():
            setattr(ti, k, v)
        tar.addfile(ti, io.BytesIO(b""))
    return out.getvalue()


@pytest.mark.parametrize("layer, words", [
    (lambda: _pax_layer("a", {"SCHILY.xattr.user.a\0b": "v"}), "xattr name holds a NUL byte"),
    (lambda: _pax_layer("a", {"path": "x\0y"}), "holds a NUL byte"),
    (lambda: _pax_layer("a", {"linkpath": "x\0y"}), "holds a NUL byte"),
    (lambda: _pax_layer("a", {"mtime": "99999999999999999999"}), "out of range"),
    (lambda: _pax_layer("a", {"mtime": "1e400"}), "a PAX mtime is malformed"),
    (lambda: _pax_layer("a", {"uid": "99999999999999999999"}), "out of range"),
    (lambda: _pax_layer("a", {}, type=b"3", devmajor=1 << 40), "out of range"),
    (lambda: t.layer([("x" * 300, "file", b"x")]), "cannot write 'x{100}' here: File name too long"),
])
def test_members_no_file_system_can_hold_are_refused_in_one_line(tmp_path, oci_cache, layer, words) -> None:
    """Found by fuzz/targets.py's oci: an xattr name or a path with a NUL byte (PAX records
    carry them) raised ValueError out of the unpacker, a huge mtime or device number
    OverflowError (a PAX mtime of 1e400 too, in the reader), a file name over 255 bytes
    OSError -- tracebacks, not one line."""
    _refused(tmp_path, [layer()], words)


@pytest.mark.parametrize("which", ["config", "layer"])
@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_a_layout_file_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path, oci_cache, which, kind) -> None:
    """Found by fuzz/targets.py's oci: a layout whose blob is a directory raised
    IsADirectoryError out of resolve_image (a traceback); a FIFO there would have blocked it
    for ever (it now opens without waiting for a writer, and is refused)."""
    import threading

    layer = t.layer([("a", "file", b"a")])
    config = t.image_config([layer], Cmd=["sh"])
    t.write_layout(tmp_path / "img", config, [layer])
    blobs = tmp_path / "img" / "blobs" / "sha256"
    target = {"config": blobs / hashlib.sha256(json.dumps(config).encode()).hexdigest(),
              "layer": blobs / hashlib.sha256(gzip.compress(layer, mtime=0)).hexdigest()}[which]
    target.unlink()
    if kind == "dir":
        target.mkdir()
    else:
        os.mkfifo(target)
    got: list[BaseException] = []

    def resolve() -> None:
        try:
            resolve_image(str(tmp_path / "img"))
        except BaseException as e:                  # (recorded for the assertion below)
            got.append(e)
    th = threading.Thread(target=resolve, daemon=True)
    th.start()
    th.join(10)
    assert got and isinstance(got[0], OciError), got
    assert "\n" not in str(got[0]) and "not a regular file" in str(got[0])


def test_layers_that_do_not_decompress_are_refused_in_one_line(tmp_path, oci_cache) -> None:
    """Found by fuzz/targets.py's oci: a zstd frame naming a dictionary raised ZstdError, a
    gzip stream with a corrupt deflate block zlib.error -- neither an OSError, both tracebacks."""
    bad_gzip = gzip.compress(b"", mtime=0)[:10] + b"\xff" * 32       # a deflate block of the reserved type
    bad_zstd = b"\x28\xb5\x2f\xfd\x21\x01\x05" + bytes(8)            # a frame naming dictionary 1
    for blob, words in ((bad_gzip, "invalid block type"), (bad_zstd, "Dictionary mismatch")):
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        BlobStore().put_bytes(digest, blob)                             # (as a registry would store it)
        root = tmp_path / words.split()[0]
        root.mkdir()
        with pytest.raises(OciError, match=f"layer 1 .*: cannot decompress it .*{words}") as e:
            apply_layers(root, BlobStore(), [digest], [])
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("user, passwd, group, expect", [
    ("app", "app:x:\u00b2:1::/home:/bin/sh\n", "", "/etc/passwd entry for app is malformed"),
    ("app", "app:x:-1:1::/home:/bin/sh\n", "", "/etc/passwd entry for app is malformed"),
    ("app", "app:x:1:99999999999::/home:/bin/sh\n", "", "/etc/passwd entry for app is malformed"),
    ("\u00b2", "", "", "ids are at most 32 bits"),
    ("1:\u00b2", "", "", "ids are at most 32 bits"),
    ("app:staff", "app:x:1:1::/home:/bin/sh\n", "staff:x:\u00b2:\n", (1, 1, [1])),
    ("app", "app:x:1:1::/home:/bin/sh\n", "big:x:99999999999:app\nsq:x:\u00b2:app\nok:x:7:app\n", (1, 1, [1, 7])),
])
def test_hostile_account_files_give_one_line_or_are_ignored(user, passwd, group, expect) -> None:
    """Found while fixing what fuzz/targets.py's oci found (by reading oci/guest.py): the
    image's /etc/passwd and /etc/group and its config's User were read with str.isdigit(),
    which takes "\u00b2" (int() then raised ValueError: a traceback), a negative uid was
    accepted, and supplementary gids were not held to 32 bits."""
    from pyvirt.errors import PyvirtError
    from pyvirt.oci.guest import user_ids

    if isinstance(expect, str):
        with pytest.raises(PyvirtError, match=expect) as e:
            user_ids(user, passwd, group)
        assert "\n" not in str(e.value)
    else:
        assert user_ids(user, passwd, group)[:3] == expect


def test_limits_are_module_constants() -> None:
    assert unpack_mod.MAX_UNPACKED >= 1 << 30 and unpack_mod.MAX_ENTRIES > 100_000


def test_busybox_layout_and_docker_archive_are_the_same_image(tmp_path, oci_cache, busybox_layers,
                                                              busybox_config) -> None:
    t.write_layout(tmp_path / "bb", busybox_config, busybox_layers)
    t.write_docker_archive(tmp_path / "bb.tar", busybox_config, busybox_layers)
    a, b = resolve_image(str(tmp_path / "bb")), resolve_image(str(tmp_path / "bb.tar"))
    assert a.digest == b.digest and a.diff_ids == b.diff_ids
    assert a.config["config"]["User"] == "app"
    assert resolve_image(f"{tmp_path / 'bb'}:latest").digest == a.digest
    with pytest.raises(OciError, match="has no image named nope"):
        resolve_image(f"{tmp_path / 'bb'}:nope")


def test_a_tampered_blob_is_refused_and_not_cached(tmp_path, oci_cache, busybox_layers, busybox_config) -> None:
    t.write_layout(tmp_path / "bb", busybox_config, busybox_layers)
    index = json.loads((tmp_path / "bb" / "index.json").read_text())
    manifest = json.loads((tmp_path / "bb" / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    victim = tmp_path / "bb" / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(OciError, match="digest mismatch .* refused"):
        resolve_image(str(tmp_path / "bb"))
    blobs = os.listdir(oci_cache / "blobs" / "sha256")
    assert manifest["layers"][1]["digest"][7:] not in blobs
    assert not [b for b in blobs if b.startswith(".")]


def test_other_platforms_are_named_in_one_line(tmp_path, oci_cache) -> None:
    layer = t.layer([("a", "file", b"a")])
    config = t.image_config([layer], architecture="amd64", Cmd=["sh"])
    t.write_layout(tmp_path / "plain", config, [layer], index_platform=False)       # the config says it
    with pytest.raises(OciError, match="the image is for linux/amd64; pyvirt runs linux/riscv64 images"):
        resolve_image(str(tmp_path / "plain"))
    t.write_layout(tmp_path / "amd", config, [layer])
    with pytest.raises(OciError, match="no linux/riscv64 image; it has linux/amd64$"):
        resolve_image(str(tmp_path / "amd"))
    index = json.loads((tmp_path / "amd" / "index.json").read_text())
    arm = dict(index["manifests"][0], platform={"os": "linux", "architecture": "arm64", "variant": "v8"})
    index["manifests"].append(arm)
    (tmp_path / "amd" / "index.json").write_text(json.dumps(index))
    with pytest.raises(OciError, match="no linux/riscv64 image; it has linux/amd64, linux/arm64/v8"):
        resolve_image(str(tmp_path / "amd"))


def test_indexes_nested_without_end_are_refused(tmp_path, oci_cache) -> None:
    """A manifest loop: content addressing makes a true cycle impossible, so a hostile source
    nests index in index; the walk stops at MAX_DEPTH."""
    layer = t.layer([("a", "file", b"a")])
    layout = tmp_path / "deep"
    t.write_layout(layout, t.image_config([layer], Cmd=["sh"]), [layer])
    top = json.loads((layout / "index.json").read_text())
    for _ in range(6):
        data = json.dumps(top).encode()
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / digest).write_bytes(data)
        top = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                                                  "digest": f"sha256:{digest}", "size": len(data),
                                                  "platform": {"os": "linux", "architecture": "riscv64"}}]}
    (layout / "index.json").write_text(json.dumps(top))
    with pytest.raises(OciError, match="nested more than 4 deep"):
        resolve_image(str(layout))


def test_a_huge_env_in_the_config_is_refused(tmp_path, oci_cache) -> None:
    from pyvirt.oci.guest import RunOptions, process
    config = {"config": {"Env": [f"K{i}=" + "v" * 100 for i in range(100_000)], "Cmd": ["sh"]}}
    with pytest.raises(OciError, match="Env is too large .* refused"):
        process(config, RunOptions(), "", "")


def test_gzip_and_plain_layers(tmp_path, oci_cache) -> None:
    plain = t.layer([("p", "file", b"plain")])
    assert gzip.decompress(gzip.compress(plain)) == plain
    t.write_docker_archive(tmp_path / "x.tar", t.image_config([plain], Cmd=["sh"]), [plain])
    img = resolve_image(str(tmp_path / "x.tar"))
    (tmp_path / "r").mkdir()
    apply_layers(tmp_path / "r", BlobStore(), img.layers, img.diff_ids)
    assert (tmp_path / "r" / "p").read_bytes() == b"plain"


@pytest.mark.parametrize("entries, words", [
    ([("../evil", "file", b"x")], "leaves the root"),
    ([("out", "symlink", "/tmp"), ("out/evil", "file", b"x")], "goes through the symlink out, refused"),
])
def test_pyvirt_run_refuses_a_hostile_image_in_one_line(tmp_path, oci_cache, entries, words) -> None:
    import sys

    from pyvirt.images import cached_default_image
    if cached_default_image() is None:
        pytest.skip("the default image is not built")
    layer = t.layer(entries)
    t.write_layout(tmp_path / "img", t.image_config([layer], Cmd=["sh"]), [layer])
    p = subprocess.run([sys.executable, "-m", "pyvirt", "run", "--oci", str(tmp_path / "img"), "true"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and words in p.stderr, p.stderr
    assert p.stderr.startswith("pyvirt: error: ")
    images = oci_cache / "images"
    assert not images.exists() or not list(images.iterdir())          # no base disk was kept
    assert not os.path.exists("/tmp/evil")
