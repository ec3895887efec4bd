"""Building pyvirt's lean riscv64 kernel from Debian's linux-source-6.1.

`make tinyconfig`, then pyvirt's fragment (data/kernel.config) merged with
olddefconfig, then a check that every option of the fragment stuck (Kconfig
silently drops options whose dependencies are missing), then `make Image`.
The result is cached under a key of every input.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from pyvirt.errors import BuildError
from pyvirt.images import cache

SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_PACKAGE = "linux-source-6.1"
CROSS = "riscv64-linux-gnu-"
BUILDER_VERSION = "1"

Status = Callable[[str, int, int], None]   # (what, done, total)


def fragment_text() -> str:
    return resources.files("pyvirt.images").joinpath("data/kernel.config").read_text()


def parse_fragment(text: str) -> dict[str, str]:
    """{CONFIG_X: 'y' | value | 'n'} from a config fragment ('# CONFIG_X is not set' = 'n')."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip('"')
            continue
        m = re.match(r"^# (CONFIG_\w+) is not set$", line)
        if m:
            out[m.group(1)] = "n"
    return out


def check_config(wanted: dict[str, str], config_text: str) -> None:
    """Raise BuildError naming the first fragment option the final .config lacks."""
    have = parse_fragment(config_text)
    for opt, value in wanted.items():
        got = have.get(opt, "n")
        if got != value:
            raise BuildError(f"kernel option {opt}={value} did not stick (the .config has {opt}={got}); "
                             "a dependency is missing from the fragment")


def _tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "missing"


def source_version() -> str:
    return _tool_version(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE])


def kernel_key() -> str:
    return cache.key("kernel", BUILDER_VERSION, fragment_text(), source_version(),
                     _tool_version([f"{CROSS}gcc", "--version"]))


def cached_kernel() -> Path | None:
    image = cache.cache_root() / f"kernel-{kernel_key()}" / "Image"
    return image if image.exists() else None


def build_kernel(status: Status | None = None) -> Path:
    """Return the cached kernel Image, building it first if needed."""
    found = cached_kernel()
    if found:
        return found
    for tool, pkg in ((f"{CROSS}gcc", "gcc-riscv64-linux-gnu"), ("make", "make"), ("flex", "flex"),
                      ("bison", "bison"), ("bc", "bc")):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is needed to build the guest kernel (install {pkg})")
    if not SOURCE_TARBALL.exists():
        raise BuildError(f"{SOURCE_TARBALL} is missing (install {SOURCE_PACKAGE})")
    final = cache.cache_root() / f"kernel-{kernel_key()}"
    work_root = cache.cache_root() / "build-tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    log_path = cache.cache_root() / "kernel-build.log"
    with cache.building(final) as out:
        src = Path(out) / "src"
        if status:
            status("unpacking linux-source-6.1", 0, 0)
        with tarfile.open(SOURCE_TARBALL) as tf:
            tf.extractall(src, filter="fully_trusted")
        tree = next(p for p in src.iterdir() if p.is_dir())
        env = dict(os.environ, ARCH="riscv", CROSS_COMPILE=CROSS, KBUILD_BUILD_USER="pyvirt",
                   KBUILD_BUILD_HOST="pyvirt", KBUILD_BUILD_TIMESTAMP="2026-01-01")
        with open(log_path, "w") as log:
            def make(*args: str, follow: bool = False) -> None:
                cmd = ["make", f"-j{os.cpu_count() or 1}", *args]
                p = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
                assert p.stdout is not None
                done = 0
                for line in p.stdout:
                    log.write(line)
                    if follow and line.startswith("  CC"):
                        done += 1
                        if status:
                            status("compiling the kernel", done, 0)
                if p.wait() != 0:
                    raise BuildError(f"kernel build step `{' '.join(cmd)}` failed; see {log_path}")
            make("tinyconfig")
            fragment = fragment_text()
            with open(tree / ".config", "a") as cfg:
                cfg.write("\n" + fragment)
            make("olddefconfig")
            check_config(parse_fragment(fragment), (tree / ".config").read_text())
            make("Image", follow=True)
        shutil.copy(tree / "arch/riscv/boot/Image", out / "Image")
        shutil.copy(tree / ".config", out / "config")
        shutil.rmtree(src)
    return final / "Image"
