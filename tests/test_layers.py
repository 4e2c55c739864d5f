"""The layers of the code (DESIGN.md): every import, lazy ones inside functions too, points
down or stays in its layer; no two modules import each other, directly or around a loop;
the engine core runs without Ray, and the model and router without Ray or
torch.distributed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first: a module may import its own layer and those before it
LAYERS = [
    "model",
    "router",
    "shards",
    "cluster.engine",
    "cluster.runtime",
    "cluster.client",
    "cluster.batch",
    "cluster.front",
    "benchmarks",
    "cluster.cli",
]
FORBIDDEN = {  # outside packages a layer must not import
    "model": ("ray", "torch.distributed"),
    "router": ("ray",),
    "cluster.engine": ("ray", "torch"),
}


def modules() -> dict[str, Path]:
    out = {}
    for top in ("model", "router", "shards", "cluster", "benchmarks"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if name != "cluster.__init__":  # a docstring: the layers are its subpackages
                out[name.removesuffix(".__init__")] = path
    return out


def layer(module: str) -> int:
    ranks = [
        i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")
    ]
    assert ranks, f"{module} is in no layer"
    return max(ranks)  # the most specific prefix (cluster.engine before cluster)


def imports(path: Path) -> list[str]:
    """Every module `path` imports, at its top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def ours(graph_modules: dict[str, Path], name: str) -> str | None:
    if not name.startswith("gptoss_ray."):
        return None
    name = name.removeprefix("gptoss_ray.")
    while name and name not in graph_modules:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for name in imports(path):
            target = ours(mods, name)
            if target is not None and target != module:
                edges[module].add(target)
    return edges


def test_every_import_points_down():
    upward = [
        f"{m} ({LAYERS[layer(m)]}) imports {t} ({LAYERS[layer(t)]})"
        for m, targets in graph().items()
        for t in targets
        if layer(t) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*path[path.index(t) :], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_low_layers_import_no_ray():
    bad = []
    for module, path in modules().items():
        banned = FORBIDDEN.get(LAYERS[layer(module)], ())
        for name in imports(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(bad)
