"""Stand-ins for what the image builder reads, made locally for its tests: a signed Debian
archive (a mirror's tree served through a file: URL, signed with a throw-away OpenPGP key),
.deb packages and kernel modules (.ko ELF files with a .modinfo section)."""

from __future__ import annotations

import hashlib
import io
import lzma
import struct
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

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


def make_signer(home: Path, name: str) -> Signer:
    home.mkdir(mode=0o700, parents=True)
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase",
                    "", "--quick-gen-key", f"{name} <{name}@example.invalid>", "ed25519", "sign", "never"],
                   capture_output=True, check=True)
    pub = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--export"], capture_output=True,
                         check=True).stdout
    keyring = home / "keyring.gpg"
    keyring.write_bytes(pub)
    return Signer(home, keyring)


def make_deb(files: dict[str, bytes], control: str, data_ext: str = "xz") -> bytes:
    """A .deb (ar: debian-binary, control.tar.xz, data.tar.<ext>) holding `files`."""
    def tar(entries: dict[str, bytes], comp: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=f"w:{comp}" if comp else "w") as tf:   # type: ignore[call-overload]
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



def fake_module(modinfo: dict[str, list[str]] | list[tuple[str, str]], extra_sections: int = 1) -> bytes:
    """A minimal ELF64 LE relocatable file with a .modinfo section (and a filler section)."""
    pairs = modinfo if isinstance(modinfo, list) else [(k, v) for k, vs in modinfo.items() for v in vs]
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)
    names = [b"", b".text", b".modinfo", b".shstrtab"]
    shstr = b"\0".join(names) + b"\0"
    offsets = [0]
    for n in names[1:]:
        offsets.append(shstr.index(n + b"\0", 1))
    body = b"\x13\x00\x00\x00" * 4                      # the filler .text
    data = body + info + shstr
    shoff = 64 + len(data)
    shoff += -shoff % 8
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    header[6] = 1
    struct.pack_into("<HHI", header, 16, 1, 243, 1)       # ET_REL, EM_RISCV
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHHHHH", header, 0x34, 64, 0, 0, 64, 4, 3)
    secs = [(0, 0, 0, 0), (offsets[1], 1, 64, len(body)), (offsets[2], 1, 64 + len(body), len(info)),
            (offsets[3], 3, 64 + len(body) + len(info), len(shstr))]
    table = b"".join(struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, 0, 0, 1, 0)
                     for name, typ, off, size in secs)
    out = bytes(header) + data
    return out + b"\0" * (shoff - len(out)) + table


