"""The import graph reads bottom-up (docs/architecture.md): no module imports a higher layer, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "munba_diffusion"
REPO = PACKAGE.parent
LAYERS = {
    "bargaining": 0,
    "config": 0,
    "io": 0,
    "step": 1,
    "row_gradients": 1,
    "models": 1,
    "presets": 1,
    "demo": 1,
    "prompts": 1,
    "clip_features": 1,
    "adversarial": 1,
    "diffusion": 2,
    "classifiers": 2,
    "pipelines": 2,
    "app": 2,
    "evaluation": 3,
    "commands": 4,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the munba_diffusion modules (or names inside them) that ``path`` imports."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("munba_diffusion", "benchmarks", "scripts")}


def _top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_top_level_module_has_a_layer():
    tops = {_top(m) for m in GRAPH} - {""}
    assert tops <= set(LAYERS), f"give {sorted(tops - set(LAYERS))} a layer in LAYERS and docs/architecture.md"


def test_imports_go_downwards_only():
    upward = sorted(
        f"{module} -> {name}"
        for module, names in GRAPH.items()
        if _top(module) in LAYERS
        for name in names
        if _top(name) in LAYERS and _top(name) != _top(module) and LAYERS[_top(name)] > LAYERS[_top(module)]
    )
    assert upward == []


def test_the_package_never_imports_the_edge():
    assert (
        sorted(
            f"{m} -> {n}" for m, names in GRAPH.items() for n in names if n.split(".")[0] in ("benchmarks", "scripts")
        )
        == []
    )


def test_no_import_cycles_between_modules():
    modules = set(GRAPH)
    edges = {m: {n for n in names if n in modules and n != m} for m, names in GRAPH.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(edges.get(node, ()))
        return False

    # a package importing its own submodules (its __init__) is not a cycle of ideas
    cycles = sorted(
        f"{a} <-> {b}"
        for a in edges
        for b in edges[a]
        if reaches(b, a) and not (b.startswith(a + ".") or a.startswith(b + "."))
    )
    assert cycles == []


def test_the_pipeline_files_are_self_contained():
    for name in ("munba.py", "munba_xl.py", "munba_sd3.py", "munba_flux.py"):
        pipeline = REPO / "pipelines" / name
        assert not {n for n in _imports(pipeline) if n.startswith("munba_diffusion")}, pipeline.name
