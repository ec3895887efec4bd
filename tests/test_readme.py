"""Every command block of README.md, run as a user would (issue 18 item 8): in a temporary
directory, with its own pyvirtd state directory and network runtime directory, so that the
README cannot drift from what pyvirt does.

Each line (with its `\\` continuations) of a ```sh block runs in bash with `pyvirt` on PATH,
in order, and must exit 0; the ```python block runs against the same daemon.  Adjustments,
each said here and in SKIP/EXPECTED below:
* a `pyvirt run` that would open an interactive console (no --command or --restore) gets
  `--command true` (the same machine boots, and the run ends);
* `pyvirt run --restore` gets --timeout 60 (the restored command then finishes by itself);
* SKIP: lines that need root, minutes (the Debian image, `make`), a terminal, or a peer
  (servers, two VMs talking: tests/integration/test_switch.py does that) -- the reason is
  in the skip list and in the test's report;
* EXPECTED: lines whose comment says they are refused (or end with a non-zero status) must
  fail, with these words.
The files the examples name (data.img, base.img, data.qcow2, Image, initrd.cpio,
busybox.oci, busybox.tar) are made first: small raw and qcow2 images, links to the default
guest's kernel and initrd, and the busybox container image of pyvirt.testing.oci.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.images import cached_default_image

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"
TIMEOUT = 300

SKIP = [
    (r"^make ", "needs minutes and root (installs packages, builds everything)"),
    (r"\bsudo\b|image build debian|--image debian", "needs root and minutes (the Debian image)"),
    (r"--bios prog\.elf", "needs your own bare-metal program"),
    (r":8000/", "needs a web server on the host's port 8000"),
    (r"httpd -f", "a server that runs until it is stopped"),
    (r"--net network=lan", "two VMs talking to each other (tests/integration/test_switch.py)"),
    (r"^pyvirt console ", "needs a terminal"),
    (r"--oci \S+:5000/", "needs a registry (tests/oci/test_registry.py starts one)"),
    (r"--oci debian\.tar", "needs the Debian image and a terminal (tests/integration/test_oci.py)"),
    (r"^pyvirt exec web -t", "needs a terminal"),
    (r"^pyvirt port ", "forwards until it is stopped"),
]
EXPECTED = {"pyvirt snapshot-rm gold": "used by",
            "pyvirt run --command 'sleep 60' --timeout 5": "the VM was stopped after 5 s"}
STATUS = {"pyvirt run --oci busybox.tar sh -c 'exit 7'": 7}     # the container's own exit status


def commands(text: str) -> Iterator[tuple[str, str]]:
    """(language, command) for each command of the README's sh and python blocks."""
    for lang, body in re.findall(r"^```(sh|python)\n(.*?)^```", text, re.S | re.M):
        if lang == "python":
            yield lang, body
            continue
        lines = body.replace("\\\n", " ").splitlines()
        for line in lines:
            cmd = re.sub(r"\s+#.*$", "", line).strip() if not line.lstrip().startswith("#") else ""
            if cmd:
                yield lang, re.sub(r"\s+", " ", cmd)


def adjusted(cmd: str) -> str:
    out = []
    for part in cmd.split("; "):
        if re.match(r"(echo .* \| )?pyvirt run\b", part) and "--restore" in part:
            part += " --timeout 60"
        elif re.match(r"pyvirt run\b", part) and "--command" not in part:
            part += " --command true"
        out.append(part)
    return "; ".join(out)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pvrm-", dir="/tmp"))     # short: socket paths hold 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_readme_commands(workdir: Path) -> None:
    img = cached_default_image()
    if img is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    from pyvirt.backends.qcow2_tools import create_qcow2
    (workdir / "bin").mkdir()
    wrapper = workdir / "bin" / "pyvirt"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m pyvirt "$@"\n')
    wrapper.chmod(0o755)
    for raw in ("data.img", "base.img"):
        with open(workdir / raw, "wb") as f:
            f.truncate(16 << 20)
    create_qcow2(str(workdir / "data.qcow2"), 64 << 20)
    (workdir / "Image").symlink_to(img.kernel)
    from pyvirt.testing import oci  # the README's busybox.oci and busybox.tar
    layers = oci.busybox_layers(oci.busybox_binary())
    oci.write_layout(workdir / "busybox.oci", oci.image_config(layers, **oci.BUSYBOX_CONFIG), layers)
    oci.write_docker_archive(workdir / "busybox.tar", oci.image_config(layers, **oci.BUSYBOX_CONFIG), layers)
    (workdir / "initrd.cpio").symlink_to(img.initrd)
    state, runtime = workdir / "state", workdir / "rt"
    runtime.mkdir(mode=0o700)
    import pyvirt
    src = str(Path(pyvirt.__file__).resolve().parent.parent)          # this pyvirt, whatever the cwd
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PATH=f"{workdir / 'bin'}:{os.environ['PATH']}", PYVIRT_STATE_DIR=str(state),
               PYVIRT_RUNTIME_DIR=str(runtime), PYTHONPATH=path)
    skipped, failures = [], []
    try:
        for lang, cmd in commands(README.read_text()):
            why = next((reason for pattern, reason in SKIP if re.search(pattern, cmd)), None)
            if why is not None:
                skipped.append(f"{cmd}: {why}")
                continue
            argv = [sys.executable, "-c", cmd] if lang == "python" else ["bash", "-c", adjusted(cmd)]
            try:
                r = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True,
                                   timeout=TIMEOUT, stdin=subprocess.DEVNULL if "echo hi |" not in cmd else None)
            except subprocess.TimeoutExpired:
                failures.append(f"{cmd}: still running after {TIMEOUT} s")
                continue
            words = EXPECTED.get(cmd)
            if cmd in STATUS:
                if r.returncode != STATUS[cmd]:
                    failures.append(f"{cmd}: exit status {r.returncode}, not {STATUS[cmd]}: {r.stderr[-500:]}")
            elif words is not None:
                if r.returncode == 0 or words not in r.stderr:
                    failures.append(f"{cmd}: expected a refusal with {words!r}, got {r.returncode}: {r.stderr}")
            elif r.returncode != 0:
                failures.append(f"{cmd}: exit status {r.returncode}: {r.stderr.strip()[-500:]}")
    finally:
        with contextlib.suppress(Exception):
            from pyvirt.host.client import Client
            with Client(state_dir=state) as c:
                for vm in c.list():
                    with contextlib.suppress(Exception):
                        c.delete(vm["name"], force=True)
        subprocess.run([sys.executable, "-m", "pyvirt", "daemon", "stop", "--state-dir", str(state)],
                       capture_output=True, timeout=60)
        subprocess.run([sys.executable, "-m", "pyvirt", "network", "rm", "lan"], env=env, capture_output=True,
                       timeout=60)
    print("skipped README commands:\n  " + "\n  ".join(skipped))
    assert not failures, "\n".join(failures)
    assert len(skipped) < 20          # (pyvirt exec -t, pyvirt port and two container lines: issues 16, 17)
