"""The import layering of src/pyvirt, read from the source (ast), lazy imports included.

LAYERS lists the layers from the bottom up; a module may import from its own group and from any
lower layer, never from a higher layer, nor from another group of its own layer (the CPU and
the devices never import each other).  The import graph has no cycles except inside cpu/riscv
(the speed work removes that one).  ARCHITECTURE.md draws the same order."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Bottom first.  Each layer is a tuple of groups; a group is a tuple of module prefixes.
LAYERS: list[tuple[tuple[str, ...], ...]] = [
    # foundation: plain values and helpers every layer may use
    (("errors", "version", "compat", "clock", "fsutil", "engines", "ratelimit", "stream", "state"),),
    (("spec",),),  # the validated VM description: data only
    (("guestcmd",),),  # the default guest's command contract (its ports are PortSpecs)
    (("memory",),),  # guest RAM and the physical bus
    (("backends",), ("network",)),  # host I/O: block, char, net; the VM-to-VM switch
    (("cpu",), ("accel",), ("devices",)),  # harts and engines | KVM vCPUs (to come) | device models
    (("machine",),),  # the board: memory map, devices, harts, boot
    (("vmm",),),  # one running VM: opens host resources, runs the board, snapshots
    (("images",),),  # guest images (the Debian image is configured by booting it: above vmm)
    (("oci",),),  # OCI images: sources, blob cache, layers, base disks, the container contract
    (("request",),),  # the one VM request: flags, API model and its resolver to a VmSpec (uses images)
    (("host",),),  # pyvirtd, its runner, API, client
    (("cli", "__main__", ""),),  # front-ends and the package facade (pyvirt/__init__.py)
    (("testing",),),  # test doubles and rigs, free to use everything
]


def _rank(module: str) -> tuple[int, int]:
    """(layer, group) of a module named relative to pyvirt ("" for the package itself)."""
    best: tuple[int, int, int] | None = None
    for li, groups in enumerate(LAYERS):
        for gi, group in enumerate(groups):
            for prefix in group:
                if module == prefix or (prefix and module.startswith(prefix + ".")):
                    if best is None or len(prefix) > best[2]:
                        best = (li, gi, len(prefix))
    assert best is not None, f"pyvirt.{module} is in no layer: add it to LAYERS"
    return best[0], best[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "pyvirt").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (annotations only, never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


@cache
def import_graph(*, typing_imports: bool = True) -> dict[str, set[str]]:
    """pyvirt module -> the pyvirt modules it imports (anywhere in its body; with
    `typing_imports=False`, leaving out those under `if TYPE_CHECKING:`)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skip = set() if typing_imports else _typing_only(tree)
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                # `from pkg import submodule` depends on the submodule, `from pkg import name` on pkg
                for a in node.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _short(module: str) -> str:
    return module.partition(".")[2]


def test_imports_point_down() -> None:
    wrong = []
    for src, targets in sorted(import_graph().items()):
        for dst in sorted(targets):
            (sl, sg), (dl, dg) = _rank(_short(src)), _rank(_short(dst))
            if dl > sl or (dl == sl and dg != sg):
                wrong.append(f"{src} -> {dst}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_cycles_outside_cpu_riscv() -> None:
    """Cycles of imports that run; an import for annotations only (`if TYPE_CHECKING:`) runs never."""
    cycles = [
        c
        for c in _cycles(import_graph(typing_imports=False))
        if not all(m.startswith("pyvirt.cpu.riscv.") for m in c)
    ]
    assert not cycles, cycles


def test_the_checks_see_violations() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _rank("machine.riscv_virt") > _rank("devices.virtio.net") > _rank("memory")
    assert _rank("cpu.riscv.hart")[0] == _rank("devices.plic")[0]
    assert _rank("cpu.riscv.hart")[1] != _rank("devices.plic")[1]
    graph = import_graph()
    assert "pyvirt.devices.virtio.mmio" in graph["pyvirt.machine.riscv_virt"]
    assert "pyvirt.network.manage" in graph["pyvirt.vmm.resources"]  # the lazy and the eager alike
