"""A small Debian archive client: signed indices, verified packages, .deb reading.

It checks what it downloads as apt does (see apt's "secure apt" design):

1. `dists/<suite>/InRelease` must be one clearsigned message with nothing
   outside it, carrying at least one good OpenPGP signature (strong digest,
   no bad signature) from a key of the Debian archive keyring, checked by
   `gpgv` in an empty home directory.  Only the *signed* text is parsed, and
   its Suite/Codename, Date and Valid-Until must fit.
2. `<component>/binary-<arch>/Packages.{xz,gz}` must match the SHA256 and
   size the verified InRelease lists (fetched by hash when the archive
   offers it, so a mirror update in between cannot mix versions).
3. Every `.deb` must match the SHA256 and size listed in that index.

Verified files are cached under <cache>/debian/<sha256> and re-hashed when
reused.  `DebFile` reads a .deb (an `ar` archive holding debian-binary,
control.tar.* and data.tar.*) in Python: no dpkg needed.

The mirror is the one the machine's apt uses (PYVIRT_DEBIAN_MIRROR overrides);
the keyring is Debian's archive keyring (debian-archive-keyring).
"""

from __future__ import annotations

import bz2
import datetime as dt
import email.utils
import gzip
import hashlib
import http.client
import io
import lzma
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, cast

from pyvirt.errors import BuildError
from pyvirt.images.cache import cache_root
from pyvirt.images.progress import Progress

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# Debian's release names and aliases: what tells the Debian archive apart from
# other apt sources (security, vendors, Ubuntu).
DEBIAN_SUITES = frozenset({"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
                           "oldoldstable", "oldstable", "stable", "testing", "unstable", "experimental"})
_SUITE_SUFFIXES = frozenset({"updates", "backports", "backports-sloppy", "proposed-updates"})
# OpenPGP hash algorithms (RFC 4880 9.4) apt no longer accepts: MD5, SHA1, RIPEMD160.
WEAK_DIGESTS = frozenset({1, 2, 3})
MAX_INDEX_BYTES = 64 << 20          # an InRelease larger than this is not a real one
TIMEOUT = 60


# -- apt's sources -----------------------------------------------------------------
@dataclass(frozen=True)
class AptSource:
    """One apt source entry (a one-line `deb` line or a deb822 stanza)."""
    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    enabled: bool = True

    def is_debian_archive(self) -> bool:
        """A binary source of Debian's main archive (not security, not another vendor)."""
        if not self.enabled or "deb" not in self.types or "main" not in self.components:
            return False
        return any(_debian_suite(s) for s in self.suites)


def _debian_suite(suite: str) -> bool:
    """bookworm, bookworm-updates, stable-backports... but not bookworm-security or a vendor's suite."""
    base, dash, rest = suite.partition("-")
    return base in DEBIAN_SUITES and (not dash or rest in _SUITE_SUFFIXES)


def parse_sources_list(text: str) -> list[AptSource]:
    """Entries of a one-line-style sources.list: `deb [opts] uri suite [component...]`."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)      # options such as [arch=amd64 signed-by=...]
        words = line.split()
        if len(words) >= 3 and words[0] in ("deb", "deb-src"):
            out.append(AptSource((words[0],), (words[1],), (words[2],), tuple(words[3:])))
    return out


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Entries of a deb822-style .sources file (Types/URIs/Suites/Components/Enabled)."""
    out = []
    for para in parse_control(text):
        enabled = para.get("Enabled", "yes").strip().lower() not in ("no", "false", "0")
        out.append(AptSource(tuple(para.get("Types", "").split()), tuple(para.get("URIs", "").split()),
                             tuple(para.get("Suites", "").split()), tuple(para.get("Components", "").split()),
                             enabled))
    return out


def apt_sources(paths: Iterable[Path] = APT_SOURCES) -> list[AptSource]:
    """Every entry of apt's sources.list and sources.list.d/*.list|*.sources."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("*.list")) + sorted(p.glob("*.sources"))
        elif p.exists():
            files.append(p)
    out: list[AptSource] = []
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        out += parse_deb822_sources(text) if f.suffix == ".sources" else parse_sources_list(text)
    return out


def mirror_from_apt(paths: Iterable[Path] = APT_SOURCES) -> str:
    """The Debian archive URL the machine's apt uses ($PYVIRT_DEBIAN_MIRROR overrides it)."""
    env = os.environ.get("PYVIRT_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    for src in apt_sources(paths):
        if src.is_debian_archive():
            for uri in src.uris:
                if uri.split(":", 1)[0] in ("http", "https", "ftp", "file"):
                    return uri.rstrip("/")
    raise BuildError("no Debian archive in apt's sources (/etc/apt/sources.list*); "
                     "set PYVIRT_DEBIAN_MIRROR to a Debian mirror URL")


# -- control-file syntax (Debian policy 5.1) ---------------------------------------
def parse_control(text: str) -> list[dict[str, str]]:
    """Paragraphs of a deb822 control file as {field: value}; continuation lines joined by \\n."""
    out: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                out.append(fields)
            fields, last = {}, ""
        elif line.startswith("#"):
            continue
        elif line[0] in " \t":
            if last:
                fields[last] = f"{fields[last]}\n{line.strip()}" if fields[last] else line.strip()
        elif ":" in line:
            k, _, v = line.partition(":")
            last = k.strip()
            fields[last] = v.strip()
    if fields:
        out.append(fields)
    return out


# -- Debian version ordering (Debian policy 5.6.12) --------------------------------
def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ca = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            cb = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ca != cb:
                return -1 if ca < cb else 1
            i += 1
            j += 1
        di = i
        while i < len(a) and a[i].isdigit():
            i += 1
        dj = j
        while j < len(b) and b[j].isdigit():
            j += 1
        na, nb = int(a[di:i] or 0), int(b[dj:j] or 0)
        if na != nb:
            return -1 if na < nb else 1
    return 0


def version_compare(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version `a` sorts before, with or after `b` (epoch:upstream-revision)."""
    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.partition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
        return int(epoch or 0), upstream, revision
    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


# -- signatures ------------------------------------------------------------------------
_BEGIN_MSG = "-----BEGIN PGP SIGNED MESSAGE-----"
_BEGIN_SIG = "-----BEGIN PGP SIGNATURE-----"
_END_SIG = "-----END PGP SIGNATURE-----"


def check_clearsigned_layout(text: str) -> None:
    """Reject anything but exactly one clearsigned message with nothing around it.

    gpgv accepts data outside the signed part and reports it only as text; apt
    refuses such files (CVE-2013-1051 / "InRelease is not clearsigned").
    """
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or lines[0].rstrip("\r") != _BEGIN_MSG:
        raise BuildError("InRelease does not start with a clearsigned message")
    marks = [(i, ln.rstrip("\r")) for i, ln in enumerate(lines) if ln.startswith("-----")]
    kinds = [m for _, m in marks]
    if kinds != [_BEGIN_MSG, _BEGIN_SIG, _END_SIG] or marks[-1][0] != len(lines) - 1:
        raise BuildError("InRelease is not exactly one clearsigned message")
    # Armor headers ("Hash: SHA256"), then one empty line, then the message.
    i = 1
    while i < len(lines) and lines[i].strip():
        if not re.match(r"^[A-Za-z]+: ", lines[i]):
            raise BuildError("InRelease has a malformed clearsign header")
        i += 1


@dataclass(frozen=True)
class Signature:
    fingerprint: str        # of the primary key
    digest_algo: int


def parse_gpg_status(status: str) -> tuple[list[Signature], list[str]]:
    """Good signatures and problems from gpgv's --status-fd output (GnuPG doc/DETAILS)."""
    good: list[Signature] = []
    problems: list[str] = []
    goodsig = False
    for line in status.splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        word, *args = line[9:].split()
        if word == "NEWSIG":
            goodsig = False
        elif word == "GOODSIG":
            goodsig = True
        elif word in ("BADSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG"):
            problems.append(f"{word} {args[0] if args else ''}".strip())
            goodsig = False
        elif word == "VALIDSIG" and goodsig and len(args) >= 9:
            primary = args[9] if len(args) > 9 else args[0]
            good.append(Signature(primary, int(args[7])))
    return good, problems


def verify_clearsigned(signed: bytes, keyring: Path, what: str = "InRelease") -> str:
    """Verify a clearsigned file with gpgv against `keyring`; return only the signed text."""
    if not keyring.exists():
        raise BuildError(f"Debian archive keyring {keyring} is missing (install debian-archive-keyring)")
    if shutil.which("gpgv") is None:
        raise BuildError("gpgv is needed to verify the Debian archive (install gpgv)")
    check_clearsigned_layout(signed.decode("utf-8", "replace"))
    with tempfile.TemporaryDirectory(prefix="pyvirt-gpgv-") as home:
        try:
            p = subprocess.run(["gpgv", "--homedir", home, "--status-fd", "2", "--keyring", str(keyring),
                                "--output", "-", "-"], input=signed, capture_output=True, timeout=TIMEOUT)
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"gpgv could not run: {e}") from None
    status = p.stderr.decode("utf-8", "replace")
    good, problems = parse_gpg_status(status)
    strong = [s for s in good if s.digest_algo not in WEAK_DIGESTS]
    if problems or not strong:
        reason = "; ".join(problems) or ("only weak digests" if good else "no good signature from the keyring")
        raise BuildError(f"{what} failed signature verification ({reason})")
    return p.stdout.decode("utf-8", "replace")


# -- indices ---------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Release:
    """The verified fields of a suite's InRelease."""
    suite: str
    codename: str
    version: str
    date: dt.datetime | None
    valid_until: dt.datetime | None
    architectures: tuple[str, ...]
    components: tuple[str, ...]
    acquire_by_hash: bool
    files: dict[str, FileEntry]


def _date(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        d = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        raise BuildError(f"InRelease has a malformed date {value!r}") from None
    return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)


def parse_release(text: str, suite: str, now: dt.datetime | None = None) -> Release:
    """Parse verified Release text and check it is `suite`'s and currently valid."""
    paras = parse_control(text)
    if not paras:
        raise BuildError("InRelease is empty")
    f = paras[0]
    if suite not in (f.get("Suite"), f.get("Codename")):
        raise BuildError(f"InRelease is for {f.get('Codename') or f.get('Suite')}, not {suite}")
    now = now or dt.datetime.now(dt.timezone.utc)
    date, valid_until = _date(f.get("Date")), _date(f.get("Valid-Until"))
    if valid_until is not None and valid_until < now:
        raise BuildError(f"InRelease for {suite} expired on {valid_until:%Y-%m-%d} (a stale mirror?)")
    if date is not None and date > now + dt.timedelta(days=1):
        raise BuildError(f"InRelease for {suite} is dated {date:%Y-%m-%d}, in the future (check the clock)")
    files: dict[str, FileEntry] = {}
    for line in f.get("SHA256", "").splitlines():
        parts = line.split()
        if len(parts) == 3 and re.fullmatch(r"[0-9a-f]{64}", parts[0]) and parts[1].isdigit():
            files[parts[2]] = FileEntry(parts[0], int(parts[1]))
    if not files:
        raise BuildError(f"InRelease for {suite} lists no SHA256 checksums")
    return Release(f.get("Suite", ""), f.get("Codename", ""), f.get("Version", ""), date, valid_until,
                   tuple(f.get("Architectures", "").split()), tuple(f.get("Components", "").split()),
                   f.get("Acquire-By-Hash", "").lower() == "yes", files)


@dataclass(frozen=True)
class Package:
    """One binary package of a Packages index."""
    name: str
    version: str
    architecture: str
    filename: str               # relative to the mirror root (pool/...)
    sha256: str
    size: int
    fields: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def depends(self) -> str:
        return self.fields.get("Depends", "")


def parse_packages(text: str) -> dict[str, Package]:
    """{name: Package} from a Packages index; the highest version wins when a name repeats."""
    out: dict[str, Package] = {}
    for f in parse_control(text):
        try:
            pkg = Package(f["Package"], f["Version"], f.get("Architecture", ""), f["Filename"],
                          f["SHA256"], int(f["Size"]), f)
        except (KeyError, ValueError):
            continue        # a stanza without what a download needs is of no use
        if (not re.fullmatch(r"[0-9a-f]{64}", pkg.sha256) or pkg.filename.startswith("/")
                or ".." in pkg.filename.split("/")):
            continue
        old = out.get(pkg.name)
        if old is None or version_compare(pkg.version, old.version) > 0:
            out[pkg.name] = pkg
    return out


_DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {".xz": lzma.decompress, ".gz": gzip.decompress, "": bytes}


class DebianArchive:
    """A Debian suite of one architecture on a mirror, with verified downloads.

    >>> archive = DebianArchive("trixie", "riscv64")
    >>> pkg, deb = archive.fetch("busybox-static")      # Package, Path of the verified .deb
    >>> DebFile(deb).read("usr/bin/busybox")
    """

    def __init__(self, suite: str = "trixie", arch: str = "riscv64", mirror: str | None = None,
                 keyring: Path = KEYRING, progress: Progress | None = None,
                 cache_dir: Path | None = None) -> None:
        self.suite = suite
        self.arch = arch
        self.mirror = (mirror or mirror_from_apt()).rstrip("/")
        self.keyring = keyring
        self.progress = progress or Progress()
        self.cache = cache_dir or cache_root() / "debian"
        self._release: Release | None = None
        self._packages: dict[str, dict[str, Package]] = {}

    # -- transport -------------------------------------------------------------
    def _open(self, path: str) -> IO[bytes]:
        """The mirror's `path`, opened; FileNotFoundError if it is not there, BuildError on failure."""
        url = f"{self.mirror}/{path}"
        try:
            return cast(IO[bytes], urllib.request.urlopen(url, timeout=TIMEOUT))
        except urllib.error.HTTPError as e:
            if e.code in (403, 404, 410):
                raise FileNotFoundError(f"{url}: HTTP {e.code}") from None
            raise BuildError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, FileNotFoundError):        # a file: mirror
                raise FileNotFoundError(f"{url}: no such file") from None
            raise BuildError(f"cannot download {url}: {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:
            raise BuildError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None

    def get_small(self, path: str, limit: int = MAX_INDEX_BYTES) -> bytes:
        """Download an unverified small file (InRelease) into memory, at most `limit` bytes."""
        try:
            with self._open(path) as r:
                data = r.read(limit + 1)
        except FileNotFoundError as e:
            raise BuildError(f"cannot download {e}") from None
        except (OSError, http.client.HTTPException) as e:
            raise BuildError(f"cannot download {self.mirror}/{path}: {e}") from None
        if len(data) > limit:
            raise BuildError(f"{self.mirror}/{path} is larger than {limit} bytes")
        return data

    def cached_file(self, sha256: str) -> Path | None:
        """The cached file with this SHA256, re-hashed (a corrupt one is dropped)."""
        target = self.cache / sha256
        if not target.is_file():
            return None
        h = hashlib.sha256()
        with open(target, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() == sha256:
            return target
        target.unlink(missing_ok=True)
        return None

    def download(self, paths: list[str], entry: FileEntry, label: str) -> Path:
        """Fetch the first of `paths` that exists, verified against `entry`; cached by SHA256."""
        found = self.cached_file(entry.sha256)
        if found:
            return found
        self.cache.mkdir(parents=True, exist_ok=True)
        missing = []
        for path in paths:
            try:
                return self._download_one(path, entry, label)
            except FileNotFoundError as e:
                missing.append(str(e))
        raise BuildError(f"cannot download {label}: {missing[-1] if missing else 'no source'}")

    def _download_one(self, path: str, entry: FileEntry, label: str) -> Path:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.sha256[:16]}.", dir=self.cache)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            done = 0
            with os.fdopen(fd, "wb") as out, self._open(path) as r:
                while True:
                    try:
                        chunk = r.read(1 << 16)
                    except (OSError, http.client.HTTPException) as e:
                        raise BuildError(f"download of {self.mirror}/{path} failed: {e}") from None
                    if not chunk:
                        break
                    done += len(chunk)
                    if done > entry.size:
                        raise BuildError(f"{path}: larger than the {entry.size} bytes the signed index lists")
                    h.update(chunk)
                    out.write(chunk)
                    self.progress.update(label, done, entry.size)
            if done != entry.size:
                raise BuildError(f"{path}: {done} bytes, the signed index lists {entry.size}")
            if h.hexdigest() != entry.sha256:
                raise BuildError(f"{path}: SHA256 {h.hexdigest()} does not match the signed index "
                                 f"({entry.sha256})")
            tmp.chmod(0o644)
            final = self.cache / entry.sha256
            os.replace(tmp, final)
            return final
        finally:
            tmp.unlink(missing_ok=True)

    # -- indices ---------------------------------------------------------------------
    def release(self) -> Release:
        """The suite's verified InRelease (downloaded once per DebianArchive)."""
        if self._release is None:
            self.progress.step(f"verifying Debian {self.suite}'s signed release file")
            signed = self.get_small(f"dists/{self.suite}/InRelease")
            text = verify_clearsigned(signed, self.keyring, f"InRelease of Debian {self.suite}")
            self._release = parse_release(text, self.suite)
            if self._release.architectures and self.arch not in self._release.architectures:
                raise BuildError(f"Debian {self.suite} has no {self.arch} architecture")
        return self._release

    def index_file(self, name: str, label: str) -> Path:
        """A file the verified InRelease lists (e.g. main/binary-riscv64/Packages.xz), verified."""
        rel = self.release()
        entry = rel.files.get(name)
        if entry is None:
            raise BuildError(f"{name} is not listed in Debian {self.suite}'s signed InRelease")
        base = f"dists/{self.suite}/{name}"
        paths = [base]
        if rel.acquire_by_hash:
            paths.insert(0, f"{PurePosixPath(base).parent}/by-hash/SHA256/{entry.sha256}")
        return self.download(paths, entry, label)

    def packages(self, component: str = "main") -> dict[str, Package]:
        """{name: Package} of the component's verified Packages index."""
        if component not in self._packages:
            rel = self.release()
            base = f"{component}/binary-{self.arch}/Packages"
            for ext, decompress in _DECOMPRESSORS.items():
                if base + ext in rel.files:
                    self.progress.step(f"reading Debian {self.suite}'s {self.arch} package index")
                    raw = self.index_file(base + ext, f"{base}{ext}").read_bytes()
                    try:
                        text = decompress(raw).decode("utf-8", "replace")
                    except (lzma.LZMAError, OSError, EOFError) as e:
                        raise BuildError(f"{base}{ext} does not decompress: {e}") from None
                    self._packages[component] = parse_packages(text)
                    break
            else:
                raise BuildError(f"{base} is not listed in Debian {self.suite}'s signed InRelease")
        return self._packages[component]

    def package(self, name: str, component: str = "main") -> Package:
        pkg = self.packages(component).get(name)
        if pkg is None:
            raise BuildError(f"package {name} is not in Debian {self.suite}/{component} for {self.arch}")
        return pkg

    def download_package(self, pkg: Package) -> Path:
        """The verified .deb of `pkg` (downloaded unless cached)."""
        return self.download([pkg.filename], FileEntry(pkg.sha256, pkg.size), f"{pkg.name} {pkg.version}")

    def fetch(self, name: str, component: str = "main") -> tuple[Package, Path]:
        pkg = self.package(name, component)
        return pkg, self.download_package(pkg)


# -- .deb files (deb(5): an ar archive) ------------------------------------------------
def ar_members(data: bytes) -> list[tuple[str, bytes]]:
    """The members of a common-format `ar` archive, in order."""
    if not data.startswith(b"!<arch>\n"):
        raise BuildError("not a Debian package (bad ar magic)")
    pos, out = 8, []
    while pos < len(data):
        if pos + 60 > len(data):
            raise BuildError("truncated ar header in Debian package")
        hdr = data[pos:pos + 60]
        size_field = hdr[48:58].strip()
        if hdr[58:60] != b"`\n" or not size_field.isdigit():
            raise BuildError("malformed ar header in Debian package")
        name = hdr[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(size_field)
        pos += 60
        if pos + size > len(data):
            raise BuildError(f"truncated ar member {name!r} in Debian package")
        out.append((name, data[pos:pos + size]))
        pos += size + (size & 1)
    return out


def decompress_member(name: str, body: bytes) -> bytes:
    """Undo the compression a .deb member's name announces (.xz .gz .zst .bz2 or none)."""
    try:
        if name.endswith(".xz"):
            return lzma.decompress(body)
        if name.endswith(".gz"):
            return gzip.decompress(body)
        if name.endswith(".bz2"):
            return bz2.decompress(body)
        if name.endswith(".zst"):
            return _zstd_decompress(body)
    except (lzma.LZMAError, OSError, EOFError, ValueError) as e:
        raise BuildError(f"{name} in Debian package does not decompress: {e}") from None
    if name.endswith(".tar"):
        return body
    raise BuildError(f"unknown compression of {name} in Debian package")


def _zstd_decompress(body: bytes) -> bytes:
    # Optional: Debian packages use xz, a few use zstd; the zstd tool stands in.
    try:
        import zstandard
    except ImportError:
        if shutil.which("zstd") is None:
            raise BuildError("a zstd-compressed Debian package needs the zstandard module or zstd") from None
        p = subprocess.run(["zstd", "-dc"], input=body, capture_output=True, timeout=300)
        if p.returncode != 0:
            raise OSError(p.stderr.decode(errors="replace").strip()) from None
        return p.stdout
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as r:
            return r.read()
    except zstandard.ZstdError as e:             # corrupt data: reported like the zstd tool's failure
        raise OSError(str(e)) from None


def _norm(path: str) -> str:
    """A tar member name as a plain relative path: "./usr/bin/x" -> "usr/bin/x", "./" -> ""."""
    p = posixpath.normpath("/" + path).lstrip("/")
    return "" if p == "." else p


def _check_member(m: tarfile.TarInfo, dest: Path) -> None:
    """What tarfile's "data" filter refuses: paths and links leaving `dest`,
    absolute paths, device nodes and FIFOs."""
    root = os.path.realpath(dest)

    def inside(path: str) -> bool:
        full = os.path.realpath(os.path.join(root, path))
        return full == root or full.startswith(root + os.sep)

    if os.path.isabs(m.name) or not inside(m.name):
        raise tarfile.TarError(f"{m.name!r} would be extracted outside the destination")
    if m.ischr() or m.isblk() or m.isfifo():
        raise tarfile.TarError(f"{m.name!r} is a special file")
    if m.issym() and (os.path.isabs(m.linkname) or
                      not inside(os.path.join(os.path.dirname(m.name), m.linkname))):
        raise tarfile.TarError(f"{m.name!r} links outside the destination")
    if m.islnk() and (os.path.isabs(m.linkname) or not inside(m.linkname)):
        raise tarfile.TarError(f"{m.name!r} links outside the destination")


class DebFile:
    """A Debian binary package read in Python: control fields and data files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        members = ar_members(path.read_bytes())
        if not members or members[0][0] != "debian-binary" or not members[0][1].startswith(b"2."):
            raise BuildError(f"{path.name} is not a format 2.x Debian package")
        self._members = dict(members)
        self._data: tarfile.TarFile | None = None

    def _tar(self, prefix: str) -> tarfile.TarFile:
        for name, body in self._members.items():
            if name.startswith(prefix):
                raw = decompress_member(name, body)
                try:
                    return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
                except tarfile.TarError as e:
                    raise BuildError(f"{name} in {self.path.name} is not a tar archive: {e}") from None
        raise BuildError(f"{self.path.name} has no {prefix} member")

    def control(self) -> dict[str, str]:
        """The fields of the package's control file."""
        tf = self._tar("control.tar")
        for m in tf.getmembers():
            if _norm(m.name) == "control" and m.isfile():
                f = tf.extractfile(m)
                if f is not None:
                    paras = parse_control(f.read().decode("utf-8", "replace"))
                    return paras[0] if paras else {}
        raise BuildError(f"{self.path.name} has no control file")

    def data(self) -> tarfile.TarFile:
        """The package's data.tar, opened (members named ./usr/...)."""
        if self._data is None:
            self._data = self._tar("data.tar")
        return self._data

    def names(self) -> list[str]:
        """Paths of the data files, normalised ("usr/bin/busybox")."""
        return [_norm(m.name) for m in self.data().getmembers() if _norm(m.name)]

    def read(self, path: str) -> bytes:
        """Content of the regular file at `path` ("usr/bin/busybox"), following symlinks inside."""
        want = _norm(path)
        members = {_norm(m.name): m for m in self.data().getmembers()}
        for _ in range(16):
            m = members.get(want)
            if m is None:
                raise BuildError(f"{self.path.name} has no file {path}")
            if m.issym():
                want = _norm(posixpath.join(posixpath.dirname(want), m.linkname))
                continue
            f = self.data().extractfile(m) if m.isfile() else None
            if f is None:
                raise BuildError(f"{path} in {self.path.name} is not a regular file")
            return f.read()
        raise BuildError(f"{path} in {self.path.name}: too many symlinks")

    def extract(self, dest: Path) -> None:
        """Unpack the data files under `dest` (no path escapes, no device nodes: tarfile's data filter)."""
        try:
            if hasattr(tarfile, "data_filter"):
                self.data().extractall(dest, filter="data")
            else:                       # interpreters without extraction filters (PyPy 3.9)
                tf = self.data()
                for m in tf.getmembers():
                    _check_member(m, dest)
                tf.extractall(dest)
        except (tarfile.TarError, OSError) as e:
            raise BuildError(f"cannot unpack {self.path.name}: {e}") from None
