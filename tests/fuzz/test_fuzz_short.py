"""The short fuzz run of `make test`: every target in fuzz/targets.py under atheris for a few
seconds (coverage-guided, with its memory and per-input time limits), and every seed input
run directly.  The long run is `make fuzz FUZZ_SECONDS=1800` (FUZZING.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "fuzz"))

import targets  # noqa: E402

SECONDS = int(os.environ.get("PYVIRT_FUZZ_SECONDS", "4"))


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_seeds_pass(name: str) -> None:
    for seed in targets.SEEDS[name]():
        targets.TARGETS[name](seed)


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_short_fuzz_run(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, str(ROOT / "fuzz" / "run.py"), name, "--seconds", str(SECONDS),
                        "--corpus", str(tmp_path / "corpus"), "--rss-mb", "768", "--timeout", "10",
                        f"-artifact_prefix={tmp_path}/"],
                       env=env, capture_output=True, text=True, timeout=120 + SECONDS)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "Done " in p.stderr
