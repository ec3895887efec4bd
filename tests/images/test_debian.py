"""The Debian archive client: apt sources, control files, versions, signatures, verified downloads."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import lzma
import tarfile
from pathlib import Path

import pytest

from pyvirt.errors import BuildError
from pyvirt.images import debian
from pyvirt.images.debian import (
    DebFile,
    DebianArchive,
    ar_members,
    check_clearsigned_layout,
    mirror_from_apt,
    parse_control,
    parse_gpg_status,
    parse_packages,
    parse_release,
    verify_clearsigned,
    version_compare,
)
from pyvirt.testing.images import ARCH, SUITE, FakeArchive, make_deb


# -- apt sources ----------------------------------------------------------------------
def test_mirror_from_one_line_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYVIRT_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64] https://vendor.example/apt stable-vendor main\n"
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian/ "
        "bookworm main contrib\n")
    assert mirror_from_apt([tmp_path / "sources.list"]) == "http://mirror.example/debian"


def test_mirror_from_deb822_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYVIRT_DEBIAN_MIRROR", raising=False)
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a.sources").write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: trixie\nComponents: main\nEnabled: no\n\n"
        "Types: deb\n# a comment inside\nURIs: http://sec.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://other.example/ubuntu\nSuites: jammy\nComponents: main\n\n"
        "Types: deb deb-src\nURIs: http://good.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    (d / "ignored.txt").write_text("deb http://nope.example/debian bookworm main\n")
    assert mirror_from_apt([tmp_path / "missing.list", d]) == "http://good.example/debian"


def test_mirror_override_and_absence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sources.list").write_text("deb http://archive.example/ubuntu jammy main\n")
    monkeypatch.delenv("PYVIRT_DEBIAN_MIRROR", raising=False)
    with pytest.raises(BuildError, match="PYVIRT_DEBIAN_MIRROR"):
        mirror_from_apt([tmp_path / "sources.list"])
    monkeypatch.setenv("PYVIRT_DEBIAN_MIRROR", "http://override.example/debian/")
    assert mirror_from_apt([tmp_path / "sources.list"]) == "http://override.example/debian"


# -- control files and versions ------------------------------------------------
def test_parse_control_continuations() -> None:
    paras = parse_control("A: 1\nB:\n x y\n .\n z\n\n\nC: 3\n")
    assert paras == [{"A": "1", "B": "x y\n.\nz"}, {"C": "3"}]


@pytest.mark.parametrize("a, b, expected", [
    ("1.0", "1.0", 0), ("1.0", "1.1", -1), ("1.10", "1.9", 1), ("1.0~rc1", "1.0", -1),
    ("1:0.1", "2.0", 1), ("1.0-1", "1.0-2", -1), ("1.0-1+b1", "1.0-1", 1), ("1.0a", "1.0", 1),
    ("1.0+dfsg", "1.0.1", -1), ("2.0-1~bpo", "2.0-1", -1), ("1:1.37.0-6+b9", "1:1.37.0-6+b10", -1),
    ("0:1.0", "1.0", 0), ("1.0.", "1.0", 1),
])
def test_version_compare(a: str, b: str, expected: int) -> None:
    assert version_compare(a, b) == expected
    assert version_compare(b, a) == -expected


def test_parse_packages_keeps_highest_version_and_drops_bad_stanzas() -> None:
    sha = "a" * 64
    text = (f"Package: p\nVersion: 1.0-1\nFilename: pool/p1.deb\nSize: 10\nSHA256: {sha}\n\n"
            f"Package: p\nVersion: 1.0-2\nFilename: pool/p2.deb\nSize: 11\nSHA256: {sha}\n\n"
            f"Package: q\nVersion: 1\nFilename: ../../etc/passwd\nSize: 1\nSHA256: {sha}\n\n"
            f"Package: r\nVersion: 1\nFilename: pool/r.deb\nSize: x\nSHA256: {sha}\n\n"
            "Package: s\nVersion: 1\nFilename: pool/s.deb\nSize: 1\nSHA256: nothex\n")
    pkgs = parse_packages(text)
    assert set(pkgs) == {"p"}
    assert pkgs["p"].version == "1.0-2" and pkgs["p"].size == 11


# -- InRelease ----------------------------------------------------------------------------
_RELEASE = ("Suite: stable\nCodename: trixie\nDate: Sat, 21 Nov 2026 09:15:44 UTC\nArchitectures: riscv64\n"
            "Components: main\nAcquire-By-Hash: yes\nSHA256:\n"
            f" {'b' * 64}  9387120 main/binary-riscv64/Packages.xz\n {'c' * 64} 12 main/i18n/Index\n")
_NOW = dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc)


def test_parse_release() -> None:
    rel = parse_release(_RELEASE, "trixie", now=_NOW)
    assert rel.codename == "trixie" and rel.acquire_by_hash and rel.architectures == ("riscv64",)
    assert rel.files["main/binary-riscv64/Packages.xz"].size == 9387120
    assert rel.files["main/i18n/Index"].sha256 == "c" * 64
    assert parse_release(_RELEASE, "stable", now=_NOW).suite == "stable"


def test_parse_release_rejects_wrong_suite_expired_and_future() -> None:
    with pytest.raises(BuildError, match="not bookworm"):
        parse_release(_RELEASE, "bookworm", now=_NOW)
    expired = _RELEASE.replace("Components", "Valid-Until: Sun, 22 Nov 2026 00:00:00 UTC\nComponents")
    with pytest.raises(BuildError, match="expired"):
        parse_release(expired, "trixie", now=_NOW)
    assert parse_release(expired, "trixie", now=_NOW - dt.timedelta(days=6)).valid_until is not None
    with pytest.raises(BuildError, match="future"):
        parse_release(_RELEASE, "trixie", now=_NOW - dt.timedelta(days=30))
    with pytest.raises(BuildError, match="no SHA256"):
        parse_release(_RELEASE.split("SHA256:")[0], "trixie", now=_NOW)


_SIG = "-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n"


@pytest.mark.parametrize("text", [
    "garbage\n-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSuite: x\n" + _SIG,
    "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSuite: x\n" + _SIG + "Suite: unsigned\n",
    "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSuite: x\n" + _SIG
    + "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSuite: y\n" + _SIG,
    "Suite: x\n",
    "-----BEGIN PGP SIGNED MESSAGE-----\nnot a header\n\nSuite: x\n" + _SIG,
])
def test_clearsigned_layout_rejects_extra_content(text: str) -> None:
    with pytest.raises(BuildError):
        check_clearsigned_layout(text)


def test_clearsigned_layout_accepts_one_message() -> None:
    check_clearsigned_layout("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSuite: x\n- --dash\n"
                             + _SIG + "\n")


def test_gpg_status_parsing() -> None:
    status = ("[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG 1111 A\n"
              "[GNUPG:] VALIDSIG FFFF 2026-11-21 1 0 4 0 1 8 01 PRIMARY1\n"
              "[GNUPG:] NEWSIG\n[GNUPG:] ERRSIG 2222 1 8 01 1 9\n[GNUPG:] NO_PUBKEY 2222\n"
              "[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG 3333 C\n"
              "[GNUPG:] VALIDSIG EEEE 2026-11-21 1 0 4 0 1 2 01 PRIMARY3\n")
    good, problems = parse_gpg_status(status)
    assert [(s.fingerprint, s.digest_algo) for s in good] == [("PRIMARY1", 8), ("PRIMARY3", 2)]
    assert problems == []
    good, problems = parse_gpg_status("[GNUPG:] NEWSIG\n[GNUPG:] BADSIG 1111 A\n"
                                      "[GNUPG:] VALIDSIG FFFF x 1 0 4 0 1 8 01 P\n")
    assert good == [] and problems == ["BADSIG 1111"]


def test_signature_good_tampered_and_untrusted(signers) -> None:
    trusted, stranger = signers
    signed = trusted.clearsign(_RELEASE)
    assert "Codename: trixie" in verify_clearsigned(signed, trusted.keyring)
    tampered = signed.replace(b"9387120", b"9387121")
    with pytest.raises(BuildError, match="signature verification"):
        verify_clearsigned(tampered, trusted.keyring)
    with pytest.raises(BuildError, match="no good signature"):
        verify_clearsigned(stranger.clearsign(_RELEASE), trusted.keyring)
    with pytest.raises(BuildError, match="weak"):
        verify_clearsigned(trusted.clearsign(_RELEASE, digest="SHA1"), trusted.keyring)
    with pytest.raises(BuildError, match="keyring"):
        verify_clearsigned(signed, Path("/nonexistent/keyring.gpg"))


# -- the client against a local archive ---------------------------------------------
def _archive(fake: FakeArchive, tmp_path: Path) -> DebianArchive:
    return DebianArchive(SUITE, ARCH, mirror=fake.mirror, keyring=fake.signer.keyring,
                         cache_dir=tmp_path / "cache")


def test_fetch_verified_package(fake_archive: FakeArchive, tmp_path: Path) -> None:
    deb = make_deb({"usr/bin/hello": b"\x7fELF hello"}, "Package: hello\nVersion: 1.0-1\n")
    fake_archive.publish({"hello": deb, "other": make_deb({"x": b"x"}, "Package: other\n")})
    archive = _archive(fake_archive, tmp_path)
    pkg, path = archive.fetch("hello")
    assert pkg.version == "1.0-1" and path.read_bytes() == deb
    assert path == tmp_path / "cache" / hashlib.sha256(deb).hexdigest()
    d = DebFile(path)
    assert d.read("usr/bin/hello") == b"\x7fELF hello"
    assert d.read("/usr/bin/hello") == b"\x7fELF hello"
    assert d.control()["Package"] == "hello"
    assert "usr/bin/hello" in d.names()
    with pytest.raises(BuildError, match="not in Debian"):
        archive.package("absent")


def test_by_hash_is_preferred_and_canonical_path_is_the_fallback(fake_archive: FakeArchive,
                                                                  tmp_path: Path) -> None:
    fake_archive.publish({"hello": make_deb({"a": b"a"}, "Package: hello\n")})
    # Only the by-hash copy is right: the client must not have read the canonical path.
    (fake_archive.dists / "main" / f"binary-{ARCH}" / "Packages.xz").write_bytes(b"stale")
    assert "hello" in _archive(fake_archive, tmp_path).packages()
    fake_archive.publish({"hello": make_deb({"a": b"a"}, "Package: hello\n")}, by_hash=False)
    assert "hello" in _archive(fake_archive, tmp_path / "2").packages()


def test_tampered_inrelease_is_rejected(fake_archive: FakeArchive, tmp_path: Path) -> None:
    fake_archive.publish({"hello": make_deb({"a": b"a"}, "Package: hello\n")})
    path = fake_archive.dists / "InRelease"
    path.write_bytes(path.read_bytes().replace(b"Components: main", b"Components: mainx"))
    with pytest.raises(BuildError, match="signature verification"):
        _archive(fake_archive, tmp_path).packages()


def test_inrelease_from_an_untrusted_key_is_rejected(fake_archive: FakeArchive, tmp_path: Path,
                                                     signers) -> None:
    fake_archive.publish({"hello": make_deb({"a": b"a"}, "Package: hello\n")}, signer=signers[1])
    with pytest.raises(BuildError, match="no good signature"):
        _archive(fake_archive, tmp_path).release()


def test_packages_index_checksum_mismatch_is_rejected(fake_archive: FakeArchive, tmp_path: Path) -> None:
    fake_archive.publish({"hello": make_deb({"a": b"a"}, "Package: hello\n")}, by_hash=False)
    index = fake_archive.dists / "main" / f"binary-{ARCH}" / "Packages.xz"
    data = bytearray(index.read_bytes())
    data[-1] ^= 1                                     # same size, different content
    index.write_bytes(bytes(data))
    with pytest.raises(BuildError, match="SHA256 .* does not match"):
        _archive(fake_archive, tmp_path).packages()
    index.write_bytes(bytes(data) + b"more")
    with pytest.raises(BuildError, match="larger than"):
        _archive(fake_archive, tmp_path).packages()
    assert not any((tmp_path / "cache").iterdir())      # nothing unverified was kept


def test_deb_checksum_and_size_mismatch_are_rejected(fake_archive: FakeArchive, tmp_path: Path) -> None:
    deb = make_deb({"usr/bin/hello": b"hello"}, "Package: hello\n")
    fake_archive.publish({"hello": deb})
    pool = next((fake_archive.root / "pool").rglob("*.deb"))
    pool.write_bytes(deb[:-1] + bytes([deb[-1] ^ 1]))
    archive = _archive(fake_archive, tmp_path)
    with pytest.raises(BuildError, match="does not match the signed index"):
        archive.fetch("hello")
    pool.write_bytes(deb[:-10])
    with pytest.raises(BuildError, match="bytes, the signed index lists"):
        archive.fetch("hello")
    pool.unlink()
    with pytest.raises(BuildError, match="cannot download"):
        archive.fetch("hello")


def test_corrupt_cache_entry_is_downloaded_again(fake_archive: FakeArchive, tmp_path: Path) -> None:
    deb = make_deb({"usr/bin/hello": b"hello"}, "Package: hello\n")
    fake_archive.publish({"hello": deb})
    archive = _archive(fake_archive, tmp_path)
    _, path = archive.fetch("hello")
    path.write_bytes(b"corrupted")
    _, again = archive.fetch("hello")
    assert again == path and again.read_bytes() == deb


# -- .deb reading ------------------------------------------------------------------
def test_deb_variants_and_malformed_archives(tmp_path: Path) -> None:
    for ext in ("xz", "gz", ""):
        p = tmp_path / f"p{ext}.deb"
        p.write_bytes(make_deb({"bin/tool": b"tool", "usr/lib/a/b": b"b"}, "Package: p\n", ext))
        assert DebFile(p).read("bin/tool") == b"tool"
    bad = tmp_path / "bad.deb"
    for data in (b"not an archive", b"!<arch>\n" + b"x" * 30,
                 make_deb({"a": b"a"}, "Package: p\n")[:-20]):
        bad.write_bytes(data)
        with pytest.raises(BuildError):
            DebFile(bad)
    assert [n for n, _ in ar_members(make_deb({"a": b"a"}, "P: p\n"))] == [
        "debian-binary", "control.tar.xz", "data.tar.xz"]


@pytest.mark.parametrize("filters", [True, False], ids=["tarfile-filter", "own-checks"])
def test_deb_symlinks_and_safe_extraction(tmp_path: Path, filters: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if not filters:                  # as on interpreters without extraction filters (PyPy 3.9)
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this interpreter's tarfile has no extraction filters")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in (("./usr/bin/real", b"real"),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("./bin/alias")
        link.type, link.linkname = tarfile.SYMTYPE, "../usr/bin/real"
        tf.addfile(link)
        evil = tarfile.TarInfo("../../escape")
        evil.size = 4
        tf.addfile(evil, io.BytesIO(b"evil"))
    body = buf.getvalue()
    deb = bytearray(b"!<arch>\n")
    for name, member in (("debian-binary", b"2.0\n"), ("data.tar.xz", body)):
        deb += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(member):<10}`\n".encode()
        deb += member + (b"\n" if len(member) % 2 else b"")
    p = tmp_path / "links.deb"
    p.write_bytes(bytes(deb))
    d = DebFile(p)
    assert d.read("bin/alias") == b"real"
    with pytest.raises(BuildError, match="cannot unpack"):
        d.extract(tmp_path / "out")
    assert not (tmp_path / "escape").exists()


def test_zstd_member(tmp_path: Path) -> None:
    import shutil
    import subprocess
    try:
        import zstandard  # noqa: F401
    except ImportError:
        if shutil.which("zstd") is None:
            pytest.skip("neither the zstandard module nor the zstd tool is installed")
    raw = b"hello zstd" * 100
    try:
        import zstandard
        packed = zstandard.ZstdCompressor().compress(raw)
    except ImportError:
        packed = subprocess.run(["zstd", "-c"], input=raw, capture_output=True, check=True).stdout
    assert debian.decompress_member("data.tar.zst", packed) == raw
    with pytest.raises(BuildError):
        debian.decompress_member("data.tar.zst", b"not zstd")
    assert debian.decompress_member("data.tar.xz", lzma.compress(raw)) == raw


# -- the real archive (needs the network; skipped without it) -------------------
@pytest.mark.slow
def test_real_trixie_inrelease_verifies_and_tampering_fails() -> None:
    try:
        archive = DebianArchive("trixie", "riscv64")
        signed = archive.get_small("dists/trixie/InRelease")
    except BuildError as e:
        pytest.skip(f"Debian archive unreachable: {e}")
    text = verify_clearsigned(signed, debian.KEYRING)
    rel = parse_release(text, "trixie")
    assert "main/binary-riscv64/Packages.xz" in rel.files
    lines = signed.split(b"\n")
    i = next(k for k, line in enumerate(lines) if b"main/binary-riscv64/Packages.xz" in line)
    lines[i] = lines[i].replace(lines[i].split()[0], b"0" * 64)
    with pytest.raises(BuildError, match="signature verification"):
        verify_clearsigned(b"\n".join(lines), debian.KEYRING)
