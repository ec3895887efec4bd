"""Names the code keeps in one place: every consumer derives from it instead of spelling it again."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import get_args

from pyvirt.engines import ENGINES

SRC = Path(__file__).resolve().parents[2] / "src" / "pyvirt"


def _choices(parser: argparse.ArgumentParser, command: list[str], flag: str) -> tuple[str, ...]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command:
            return _choices(action.choices[command[0]], command[1:], flag)
        if flag in action.option_strings:
            return tuple(action.choices or ())
    raise AssertionError(f"no {flag} in {command}")


def test_engines_derive_from_the_registry() -> None:
    from pyvirt.cli import _parser as build_parser
    from pyvirt.host.models import VmCreate
    from pyvirt.spec import VmSpec

    assert ENGINES == ("interp", "jit", "native")
    assert get_args(VmSpec.model_fields["engine"].annotation) == ENGINES
    engine, none = get_args(VmCreate.model_fields["engine"].annotation)
    assert get_args(engine) == ENGINES and none is type(None)
    parser = build_parser()
    assert _choices(parser, ["run"], "--engine") == ENGINES
    assert _choices(parser, ["create"], "--engine") == ENGINES


def test_no_module_lists_the_engine_names_again() -> None:
    """A tuple, list or Literal naming two engines or more outside engines.py (src/, bench/) is a second registry."""
    offenders = []
    for path in sorted([*SRC.rglob("*.py"), *(SRC.parents[1] / "bench").glob("*.py")]):
        if path.name == "engines.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
            names = {e.value for e in elts if isinstance(e, ast.Constant)} & set(ENGINES)
            if len(names) >= 2:
                offenders.append(f"{path.relative_to(SRC.parents[1])}:{node.lineno}")
    assert not offenders, offenders


def test_one_agent_port() -> None:
    """The guest agent's port name is a contract with the guest's /init: spelled once in Python."""
    from pyvirt.guestcmd import AGENT_PORT

    spelled = [
        str(path.relative_to(SRC))
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value == AGENT_PORT
    ]
    assert spelled == ["guestcmd.py"]
    assert f"/dev/virtio-ports/{AGENT_PORT}\n" in (SRC / "images" / "data" / "init").read_text()


def test_snapshot_file_names_are_spelled_once() -> None:
    """ "disk i's overlay is disk{i}.qcow2" and the snapshot's other file names live in
    vmm/snapfiles.py; vmm, host and archive code call it."""
    from pyvirt.vmm import snapfiles

    names = {snapfiles.STATE, snapfiles.MANIFEST}  # (RAM, "ram", is too common a word to police)
    spelled = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        if rel == "vmm/snapfiles.py" or rel.startswith("images/"):  # images: the build cache's own manifests
            continue
        if rel.startswith("oci/") or rel == "testing/oci.py":  # docker save's manifest.json (docker's name)
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = ""
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            elif isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if text.startswith("disk") and text.endswith((".qcow2", ".raw")):
                    spelled.append(f"{rel}:{node.lineno}")
            if text in names or text.endswith(tuple("/" + n for n in names)):
                spelled.append(f"{rel}:{node.lineno}")
    assert not spelled, spelled
    assert (snapfiles.overlay_name(3), snapfiles.image_name(3)) == ("disk3.qcow2", "disk3.raw")
