"""Fixtures for the image builder tests: a throw-away OpenPGP key and a local Debian archive.

The archive is a real directory tree served through a file: URL, laid out as
a Debian mirror (dists/<suite>/InRelease, main/binary-riscv64/Packages.xz with
by-hash copies, pool/.../*.deb), signed with a key made for the test session,
so the client is exercised end to end without the network.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyvirt.testing.images import ARCH, SUITE, FakeArchive, Signer, make_deb, make_signer

__all__ = ["ARCH", "SUITE", "FakeArchive", "Signer", "make_deb"]     # (also in pyvirt.testing.images)

@pytest.fixture(scope="session")
def signers(tmp_path_factory: pytest.TempPathFactory):
    """Two unrelated signing keys: (trusted, stranger)."""
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        pytest.skip("gpg and gpgv are needed to make and check test signatures")
    root = tmp_path_factory.mktemp("gpg")
    made = [make_signer(root / "trusted", "trusted"), make_signer(root / "stranger", "stranger")]
    yield made
    for s in made:
        subprocess.run(["gpgconf", "--homedir", str(s.home), "--kill", "all"], capture_output=True)


@pytest.fixture
def fake_archive(tmp_path: Path, signers) -> FakeArchive:
    return FakeArchive(tmp_path / "mirror", signers[0])
