"""QEMU's image tools as functions: the reference that pyvirt's qcow2 code is checked against."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    if QEMU_IMG is None:
        raise RuntimeError("qemu-img is not installed (Debian: qemu-utils)")
    r = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise RuntimeError(f"qemu-img {' '.join(map(str, args))}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def qemu_io(image: str | Path, *commands: str, fmt: str = "qcow2") -> str:
    """Run qemu-io commands (`write -P 0xab 0 64k`, `write -z 0 4k`, `discard 0 64k`) on an image."""
    if QEMU_IO is None:
        raise RuntimeError("qemu-io is not installed (Debian: qemu-utils)")
    args = [QEMU_IO, "-f", fmt]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, str(image)], capture_output=True, text=True, timeout=120)
    if r.returncode or "error" in r.stdout.lower() or "failed" in r.stdout.lower():
        raise RuntimeError(f"qemu-io {commands}: {r.stderr.strip()} {r.stdout.strip()}")
    return r.stdout


def create(path: str | Path, size: int, *, fmt: str = "qcow2", cluster_size: int | None = None,
           backing: str | Path | None = None, backing_fmt: str | None = None,
           options: tuple[str, ...] = ()) -> Path:
    opts = list(options)
    if cluster_size is not None:
        opts.append(f"cluster_size={cluster_size}")
    args: list[str | Path] = ["create", "-q", "-f", fmt]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt or "raw"]
    qemu_img(*args, path, str(size))
    return Path(path)


def check(path: str | Path) -> dict[str, Any]:
    """`qemu-img check` as JSON, plus `returncode` (0 clean, 2 corrupt, 3 leaks only)."""
    r = qemu_img("check", "--output=json", path, check=False)
    try:
        out = json.loads(r.stdout) if r.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {"unparsed": r.stdout}
    out["returncode"] = r.returncode
    out["stderr"] = r.stderr
    return out


def info(path: str | Path) -> dict[str, Any]:
    return json.loads(qemu_img("info", "--output=json", path).stdout)


def to_raw(path: str | Path, fmt: str = "qcow2") -> bytes:
    """The virtual disk's contents as QEMU reads them."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.raw"
        qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
        return out.read_bytes()


def compare(image: str | Path, raw: str | Path) -> subprocess.CompletedProcess[str]:
    """`qemu-img compare` of an image against a raw file (returncode 0: identical)."""
    return qemu_img("compare", "-f", "qcow2", "-F", "raw", image, raw, check=False)
