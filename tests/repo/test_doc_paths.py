"""Every repository path named in README.md, ARCHITECTURE.md and docs/*.md exists.

A path is a token ending in a source or document extension (``vmm/vm.py``, ``bench/boot.py``,
``emit.py``) or a backticked directory (``cpu/riscv/``).  Paths in the map are written relative
to the repository root or to ``src/pyvirt``; a bare file name may stand for any tracked file of
that name (the CPU chapter says ``emit.py`` inside ``cpu/riscv/``).  A path leaving the repository
(``../``) is refused: a reader of a clone cannot follow it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "pyvirt"
DOCS = [
    "README.md",
    "ARCHITECTURE.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
]

FILE = re.compile(r"(?<![\w/.~-])((?:\.\./)*[A-Za-z0-9_][A-Za-z0-9_./-]*\.(?:py|md|sh|toml|c|h))\b")
DIRECTORY = re.compile(r"`((?:\.\./)*[A-Za-z0-9_][A-Za-z0-9_./-]*/)`")
# Directories the documents name that are made at run time (state, cgroups), not kept in the repository.
RUNTIME_DIRECTORIES = {"dir/live/", "disks/", "networks/", "pyvirt/"}


def _tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def _exists(name: str, basenames: set[str]) -> bool:
    if "/" not in name.rstrip("/"):
        if name.endswith("/"):
            return any(p.is_dir() for p in (ROOT / name, PACKAGE / name))
        return name in basenames
    bases = [ROOT, PACKAGE, *(p for p in PACKAGE.iterdir() if p.is_dir())]
    return any((b / name).exists() for b in bases)


def _paths(text: str) -> set[str]:
    return {m.group(1) for m in FILE.finditer(text)} | {m.group(1) for m in DIRECTORY.finditer(text)}


@pytest.mark.parametrize("doc", DOCS)
def test_named_paths_exist(doc: str) -> None:
    basenames = {Path(p).name for p in _tracked()}
    text = (ROOT / doc).read_text()
    outside = sorted(p for p in _paths(text) if p.startswith("../"))
    assert not outside, f"{doc} names paths outside the repository: {outside}"
    missing = sorted(p for p in _paths(text) - RUNTIME_DIRECTORIES if not _exists(p, basenames))
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_the_check_sees_paths() -> None:
    """The extraction itself: names in prose, in backticks and in the layer map are found."""
    text = "see `vmm/vm.py` and bench/boot.py, `cpu/riscv/`, ../shared/design.md; not state.json"
    assert _paths(text) == {"vmm/vm.py", "bench/boot.py", "cpu/riscv/", "../shared/design.md"}
