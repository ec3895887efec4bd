"""Fixtures for the image builder tests: a throw-away OpenPGP key and a local Debian archive.

The archive is a real directory tree served through a file: URL, laid out as
a Debian mirror (dists/<suite>/InRelease, main/binary-riscv64/Packages.xz with
by-hash copies, pool/.../*.deb), signed with a key made for the test session,
so the client is exercised end to end without the network.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SUITE = "testsuite"
ARCH = "riscv64"


@dataclass
class Signer:
    home: Path
    keyring: Path           # binary keyring of the public key (what gpgv reads)

    def clearsign(self, text: str, digest: str = "SHA256") -> bytes:
        p = subprocess.run(["gpg", "--homedir", str(self.home), "--batch", "--yes", "--pinentry-mode",
                            "loopback", "--passphrase", "", "--digest-algo", digest, "--clearsign"],
                           input=text.encode(), capture_output=True, check=True)
        return p.stdout


def _make_signer(home: Path, name: str) -> Signer:
    home.mkdir(mode=0o700, parents=True)
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase",
                    "", "--quick-gen-key", f"{name} <{name}@example.invalid>", "ed25519", "sign", "never"],
                   capture_output=True, check=True)
    pub = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--export"], capture_output=True,
                         check=True).stdout
    keyring = home / "keyring.gpg"
    keyring.write_bytes(pub)
    return Signer(home, keyring)


@pytest.fixture(scope="session")
def signers(tmp_path_factory: pytest.TempPathFactory):
    """Two unrelated signing keys: (trusted, stranger)."""
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        pytest.skip("gpg and gpgv are needed to make and check test signatures")
    root = tmp_path_factory.mktemp("gpg")
    made = [_make_signer(root / "trusted", "trusted"), _make_signer(root / "stranger", "stranger")]
    yield made
    for s in made:
        subprocess.run(["gpgconf", "--homedir", str(s.home), "--kill", "all"], capture_output=True)


def make_deb(files: dict[str, bytes], control: str, data_ext: str = "xz") -> bytes:
    """A .deb (ar: debian-binary, control.tar.xz, data.tar.<ext>) holding `files`."""
    def tar(entries: dict[str, bytes], comp: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=f"w:{comp}" if comp else "w") as tf:
            dirs: set[str] = set()
            for name, data in entries.items():
                parts = name.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    d = "/".join(parts[:i])
                    if d not in dirs:
                        dirs.add(d)
                        info = tarfile.TarInfo(f"./{d}/")
                        info.type = tarfile.DIRTYPE
                        info.mode = 0o755
                        tf.addfile(info)
                info = tarfile.TarInfo(f"./{name}")
                info.size = len(data)
                info.mode = 0o755
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar({"control": control.encode()}, "xz")),
               (f"data.tar.{data_ext}" if data_ext else "data.tar", tar(files, data_ext))]
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        out += body + (b"\n" if len(body) % 2 else b"")
    return bytes(out)


@dataclass
class FakeArchive:
    root: Path
    signer: Signer

    @property
    def mirror(self) -> str:
        return self.root.as_uri()

    @property
    def dists(self) -> Path:
        return self.root / "dists" / SUITE

    def publish(self, packages: dict[str, bytes], *, by_hash: bool = True, extra_release: str = "",
                signer: Signer | None = None, digest: str = "SHA256") -> None:
        """Write pool/, the Packages index (xz, by-hash too) and a signed InRelease."""
        stanzas = []
        for name, deb in packages.items():
            rel = f"pool/main/{name[0]}/{name}/{name}_1.0-1_{ARCH}.deb"
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(deb)
            stanzas.append(f"Package: {name}\nVersion: 1.0-1\nArchitecture: {ARCH}\nFilename: {rel}\n"
                           f"Size: {len(deb)}\nSHA256: {hashlib.sha256(deb).hexdigest()}\n"
                           f"Description: test package {name}\n")
        index = lzma.compress("\n".join(stanzas).encode())
        binary = self.dists / "main" / f"binary-{ARCH}"
        binary.mkdir(parents=True, exist_ok=True)
        (binary / "Packages.xz").write_bytes(index)
        sha = hashlib.sha256(index).hexdigest()
        if by_hash:
            (binary / "by-hash" / "SHA256").mkdir(parents=True, exist_ok=True)
            (binary / "by-hash" / "SHA256" / sha).write_bytes(index)
        release = (f"Origin: Debian\nSuite: {SUITE}\nCodename: {SUITE}\nDate: Sat, 01 Jan 2022 00:00:00 UTC\n"
                   f"Architectures: {ARCH}\nComponents: main\n"
                   f"Acquire-By-Hash: {'yes' if by_hash else 'no'}\n{extra_release}"
                   f"SHA256:\n {sha} {len(index)} main/binary-{ARCH}/Packages.xz\n")
        (self.dists / "InRelease").write_bytes((signer or self.signer).clearsign(release, digest))


@pytest.fixture
def fake_archive(tmp_path: Path, signers) -> FakeArchive:
    return FakeArchive(tmp_path / "mirror", signers[0])
