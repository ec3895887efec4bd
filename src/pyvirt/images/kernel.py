"""Building pyvirt's lean riscv64 kernel from Debian's linux-source-6.1.

Steps (in a scratch tree under <cache>/build-tmp, removed afterwards):

1. unpack /usr/src/linux-source-6.1.tar.xz;
2. `make ARCH=riscv CROSS_COMPILE=riscv64-linux-gnu- tinyconfig`;
3. append pyvirt's fragment (data/kernel.config) and `make olddefconfig`
   (a later assignment in .config overrides an earlier one);
4. check that every option of the fragment ended up as written: Kconfig
   silently drops an option whose dependencies are missing;
5. `make -j$(nproc) Image` (uncompressed arch/riscv/boot/Image), following
   make's output for progress.

The result (Image, the final .config, System.map) is cached under a key of
every input: the fragment, the linux-source package version, the cross
compiler's version and BUILDER_VERSION.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from pyvirt.errors import BuildError
from pyvirt.images import cache
from pyvirt.images.progress import Progress

SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_PACKAGE = "linux-source-6.1"
CROSS = "riscv64-linux-gnu-"
BUILDER_VERSION = "2"
# About how many objects `make Image` compiles with the fragment (for the
# progress bar only; measured, and the bar stops short of 100% if it is low).
EXPECTED_COMPILE_STEPS = 740
_STEP = re.compile(r"^\s+(CC|AS)\s")


def fragment_text() -> str:
    return resources.files("pyvirt.images").joinpath("data/kernel.config").read_text()


def parse_config(text: str) -> dict[str, str]:
    """{CONFIG_X: value} from a .config or fragment; `# CONFIG_X is not set` gives 'n'.

    Values are kept as written, without quotes for strings; a later line
    overrides an earlier one, as in Kconfig.
    """
    out = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            value = m.group(2)
            out[m.group(1)] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
            continue
        m = re.match(r"^# (CONFIG_\w+) is not set$", line)
        if m:
            out[m.group(1)] = "n"
    return out


def check_config(wanted: dict[str, str], config_text: str) -> None:
    """Raise BuildError naming the first option of `wanted` the final .config does not have as asked.

    An option absent from the .config counts as 'n' (Kconfig omits symbols
    whose menu is disabled).
    """
    have = parse_config(config_text)
    for opt, value in wanted.items():
        got = have.get(opt, "n")
        if got != value:
            raise BuildError(f"kernel option {opt}={value} did not stick (the final .config has "
                             f"{opt}={got}): a dependency is missing from the fragment")


def _tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "missing"


def source_version() -> str:
    """The installed linux-source-6.1 package version (dpkg)."""
    return _tool_version(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE])


def compiler_version() -> str:
    return _tool_version([f"{CROSS}gcc", "--version"]).split("\n", 1)[0]


def kernel_inputs() -> dict[str, str]:
    """Everything that decides the kernel's content (the cache key's parts)."""
    return {"builder": BUILDER_VERSION, "fragment": fragment_text(), "linux-source": source_version(),
            "compiler": compiler_version()}


def kernel_dir() -> Path:
    inputs = kernel_inputs()
    return cache.cache_root() / f"kernel-{cache.key('kernel', *inputs.values())}"


def cached_kernel() -> Path | None:
    """The cached Image for the current inputs, or None."""
    image = kernel_dir() / "Image"
    return image if image.is_file() else None


def _check_tools() -> None:
    for tool, pkg in ((f"{CROSS}gcc", "gcc-riscv64-linux-gnu"), ("make", "make"), ("flex", "flex"),
                      ("bison", "bison"), ("bc", "bc"), ("tar", "tar"), ("xz", "xz-utils"),
                      ("perl", "perl")):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is needed to build the guest kernel (install {pkg})")
    if not SOURCE_TARBALL.is_file():
        raise BuildError(f"{SOURCE_TARBALL} is missing (install {SOURCE_PACKAGE})")
    if source_version() in ("", "missing"):
        raise BuildError(f"{SOURCE_PACKAGE} is not installed according to dpkg (install {SOURCE_PACKAGE})")


class _Make:
    """Runs build commands in the kernel tree, appending their output to the log."""

    def __init__(self, tree: Path, log: Path, progress: Progress) -> None:
        self.tree = tree
        self.log = log
        self.progress = progress
        self.env = dict(os.environ, ARCH="riscv", CROSS_COMPILE=CROSS, KBUILD_BUILD_USER="pyvirt",
                        KBUILD_BUILD_HOST="pyvirt", KBUILD_BUILD_TIMESTAMP="2026-01-01", LC_ALL="C")
        self.env.pop("MAKEFLAGS", None)

    def run(self, *args: str, count: str | None = None) -> None:
        """Run `args`; if `count` is set, report compile steps under that label."""
        with open(self.log, "a") as log:
            log.write(f"$ {' '.join(args)}\n")
            log.flush()
            try:
                p = subprocess.Popen(args, cwd=self.tree, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
            except OSError as e:
                raise BuildError(f"cannot run {args[0]}: {e}") from None
            assert p.stdout is not None
            done = 0
            for line in p.stdout:
                log.write(line)
                if count and _STEP.match(line):
                    done += 1
                    self.progress.update(count, done, max(EXPECTED_COMPILE_STEPS, done + 1), "files")
            if p.wait() != 0:
                raise BuildError(f"kernel build step `{' '.join(args)}` failed; see {self.log}")
            if count:
                self.progress.update(count, done, done, "files")


def build_kernel(progress: Progress | None = None) -> Path:
    """Return the cached kernel Image, building it first if needed (about 3 minutes on 2 cores)."""
    progress = progress or Progress()
    found = cached_kernel()
    if found:
        return found
    _check_tools()
    inputs = kernel_inputs()
    final = kernel_dir()
    with cache.lock(final.name):
        if (final / "Image").is_file():         # built by another process while we waited
            return final / "Image"
        log = cache.log_path(f"{final.name}.log")
        log.write_text(f"pyvirt kernel build, inputs: {json.dumps({**inputs, 'fragment': '...'})}\n")
        start = time.monotonic()
        scratch = cache.scratch_dir(final.name)
        try:
            progress.step(f"unpacking {SOURCE_TARBALL.name}")
            src = scratch / "src"
            src.mkdir()
            make = _Make(src, log, progress)
            make.run("tar", "-xJf", str(SOURCE_TARBALL), "--strip-components=1", "--no-same-owner")
            jobs = f"-j{os.cpu_count() or 1}"
            progress.step("configuring the kernel (tinyconfig + pyvirt's fragment)")
            make.run("make", jobs, "tinyconfig")
            fragment = fragment_text()
            with open(src / ".config", "a") as cfg:
                cfg.write("\n# pyvirt's fragment\n" + fragment)
            make.run("make", jobs, "olddefconfig")
            config = (src / ".config").read_text()
            check_config(parse_config(fragment), config)
            progress.step(f"compiling the kernel (make {jobs} Image)")
            make.run("make", jobs, "Image", count="compiling the kernel")
            with cache.building(final) as out:
                shutil.copy(src / "arch/riscv/boot/Image", out / "Image")
                (out / "config").write_text(config)
                shutil.copy(src / "System.map", out / "System.map")   # symbols, for profiling guests
                manifest = {**inputs, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "image_bytes": (out / "Image").stat().st_size}
                (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        mins, secs = divmod(int(time.monotonic() - start), 60)
        progress.note(f"kernel built in {mins}m{secs:02d}s: {final / 'Image'}")
    return final / "Image"
