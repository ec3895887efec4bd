"""A small Debian archive client: signed indices, verified packages, .deb extraction.

It checks what it downloads as apt does: the suite's `InRelease` must carry a
good OpenPGP signature from the Debian archive keyring (verified by `gpgv`),
only the *verified* text is parsed, the `Packages` index must match the
SHA256 listed there, and every `.deb` must match the SHA256 and size listed
in the index.  Downloads are cached by their SHA256.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import re
import subprocess
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvirt.errors import BuildError
from pyvirt.images.cache import cache_root

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))

Progress = Callable[[str, int, int], None]      # (label, done bytes, total bytes)


def mirror_from_apt() -> str:
    """The Debian archive URL the machine's apt uses (PYVIRT_DEBIAN_MIRROR overrides)."""
    env = os.environ.get("PYVIRT_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    files: list[Path] = []
    for p in APT_SOURCES:
        if p.is_dir():
            files += sorted(p.glob("*.list")) + sorted(p.glob("*.sources"))
        elif p.exists():
            files.append(p)
    candidates: list[str] = []
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
            if m:
                candidates.append(m.group(1))
            elif line.startswith("URIs:"):
                candidates += line.split()[1:]
    for url in candidates:
        u = url.rstrip("/")
        if u.endswith("/debian") and "security" not in u:
            return u
    raise BuildError("no Debian archive found in apt's sources; set PYVIRT_DEBIAN_MIRROR")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    sha256: str
    size: int


def _paragraphs(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        last = None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and last:
                fields[last] += "\n" + line.strip()
            elif ":" in line:
                k, _, v = line.partition(":")
                last = k.strip()
                fields[last] = v.strip()
        if fields:
            out.append(fields)
    return out


class DebianArchive:
    def __init__(self, suite: str = "trixie", arch: str = "riscv64", mirror: str | None = None,
                 keyring: Path = KEYRING, progress: Progress | None = None) -> None:
        self.suite = suite
        self.arch = arch
        self.mirror = mirror or mirror_from_apt()
        self.keyring = keyring
        self.progress = progress
        self.cache = cache_root() / "debian"
        self._release: dict[str, tuple[str, int]] | None = None
        self._packages: dict[str, Package] | None = None

    # -- transport -------------------------------------------------------------
    def _get(self, path: str, label: str) -> bytes:
        url = f"{self.mirror}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                total = int(r.headers.get("Content-Length") or 0)
                buf = io.BytesIO()
                while True:
                    chunk = r.read(1 << 16)
                    if not chunk:
                        break
                    buf.write(chunk)
                    if self.progress:
                        self.progress(label, buf.tell(), total)
                return buf.getvalue()
        except (urllib.error.URLError, OSError) as e:
            raise BuildError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None

    def _cached(self, sha256: str, path: str, size: int | None, label: str) -> bytes:
        """Fetch `path`, verified against `sha256` (and `size`); cached by hash."""
        target = self.cache / sha256
        if target.exists():
            data = target.read_bytes()
            if hashlib.sha256(data).hexdigest() == sha256:
                return data
        data = self._get(path, label)
        if size is not None and len(data) != size:
            raise BuildError(f"{path}: size {len(data)} does not match the signed index ({size})")
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise BuildError(f"{path}: SHA256 {got} does not match the signed index ({sha256})")
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return data

    # -- indices ----------------------------------------------------------------------
    def verify_inrelease(self, signed: bytes) -> str:
        """Check the clearsigned InRelease with gpgv; return only the verified text."""
        if not self.keyring.exists():
            raise BuildError(f"Debian archive keyring {self.keyring} is missing "
                             "(install debian-archive-keyring)")
        try:
            p = subprocess.run(["gpgv", "--quiet", "--keyring", str(self.keyring), "--output", "-", "-"],
                               input=signed, capture_output=True, timeout=60)
        except FileNotFoundError:
            raise BuildError("gpgv is not installed (install gpgv)") from None
        if p.returncode != 0:
            reason = p.stderr.decode(errors="replace").strip().splitlines()
            raise BuildError(f"InRelease for {self.suite} failed signature verification: "
                             f"{reason[-1] if reason else 'gpgv error'}")
        return p.stdout.decode()

    def release(self) -> dict[str, tuple[str, int]]:
        """{path: (sha256, size)} from the verified InRelease."""
        if self._release is None:
            text = self.verify_inrelease(self._get(f"dists/{self.suite}/InRelease", "InRelease"))
            fields = _paragraphs(text)[0]
            if fields.get("Suite") != self.suite and fields.get("Codename") != self.suite:
                raise BuildError(f"InRelease is for {fields.get('Codename')}, not {self.suite}")
            entries: dict[str, tuple[str, int]] = {}
            for line in fields.get("SHA256", "").splitlines():
                parts = line.split()
                if len(parts) == 3:
                    entries[parts[2]] = (parts[0], int(parts[1]))
            self._release = entries
        return self._release

    def packages(self) -> dict[str, Package]:
        if self._packages is None:
            rel = self.release()
            base = f"main/binary-{self.arch}/Packages"
            if f"{base}.xz" not in rel:
                raise BuildError(f"{base}.xz is not listed in the signed InRelease")
            sha, size = rel[f"{base}.xz"]
            raw = self._cached(sha, f"dists/{self.suite}/{base}.xz", size, "Packages index")
            text = lzma.decompress(raw).decode("utf-8", "replace")
            pkgs = {}
            for f in _paragraphs(text):
                if "Package" in f and "Filename" in f and "SHA256" in f:
                    pkgs[f["Package"]] = Package(f["Package"], f.get("Version", ""), f["Filename"],
                                                 f["SHA256"], int(f.get("Size", "0")))
            self._packages = pkgs
        return self._packages

    def fetch(self, name: str) -> tuple[Package, bytes]:
        pkg = self.packages().get(name)
        if pkg is None:
            raise BuildError(f"package {name} not found in Debian {self.suite}/{self.arch}")
        return pkg, self._cached(pkg.sha256, pkg.filename, pkg.size, f"{name} {pkg.version}")


# -- .deb files -------------------------------------------------------------------------
def ar_members(data: bytes) -> dict[str, bytes]:
    if not data.startswith(b"!<arch>\n"):
        raise BuildError("not a Debian package (bad ar magic)")
    pos, out = 8, {}
    while pos + 60 <= len(data):
        hdr = data[pos:pos + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        pos += 60
        out[name] = data[pos:pos + size]
        pos += size + (size & 1)
    return out


def deb_data(deb: bytes) -> tarfile.TarFile:
    """The data.tar member of a .deb, opened."""
    for name, body in ar_members(deb).items():
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                import zstandard
                body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
                return tarfile.open(fileobj=io.BytesIO(body), mode="r:")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
    raise BuildError("Debian package has no data.tar member")


def deb_file(deb: bytes, suffix: str) -> bytes:
    """The content of the one regular file in the .deb whose path ends with `suffix`."""
    tf = deb_data(deb)
    for m in tf.getmembers():
        if m.isfile() and m.name.endswith(suffix):
            f = tf.extractfile(m)
            assert f is not None
            return f.read()
    raise BuildError(f"no file ending in {suffix} in the package")
