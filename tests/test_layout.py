"""The package's folders are its architecture: imports flow one way between them, nothing imports in a circle,
and family facts live in the adapters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hf_subprune

PACKAGE = Path(hf_subprune.__file__).parent
FAMILY_NAMES = {"llama", "mistral", "qwen2", "qwen3", "bert", "roberta", "gpt2"}

# What each part may import from the package (besides itself). Top-level modules are named by their file.
ALLOWED = {
    "maths": set(),
    "adapters": set(),
    "files": set(),
    "config": {"maths", "files"},
    "logs": set(),
    "distributed": set(),
    "calibration": set(),
    "synthetic": set(),
    "checks": {"adapters"},
    "pipeline": {"maths", "adapters", "config", "distributed", "logs"},
    "outputs": {"adapters", "config", "pipeline", "logs", "files"},
    "integrations": {"maths", "adapters", "files", "config", "logs", "distributed", "calibration", "checks",
                     "synthetic", "pipeline", "outputs", "api", "evaluation", "loading"},  # everything but the cli
}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")
            if "remote_code" not in p.parts}


def _imports(name: str, path: Path) -> set[str]:
    """Package modules imported anywhere in the file (module level and inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("hf_subprune"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hf_subprune"))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hf_subprune"


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_flow_one_way(part):
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if _part(name) != part:
            continue
        for target in _imports(name, path):
            if target in modules or target.rsplit(".", 1)[0] in modules:
                other = _part(target)
                if other not in (part, "hf_subprune") and other not in ALLOWED[part]:
                    bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {t if t in modules else t.rsplit(".", 1)[0] for t in _imports(name, path)} & set(modules)
             for name, path in modules.items()}
    for name in graph:  # a package's __init__ importing its own submodules is not a cycle of concern
        graph[name] = {t for t in graph[name] if not (name.endswith("__init__") or t == name)}
    graph = {k.removesuffix(".__init__"): {t.removesuffix(".__init__") for t in v} for k, v in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node == "hf_subprune":
                continue  # a package and its own submodules
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_family_names_only_in_adapters():
    """Adding a family is one adapter entry: no other module tests model_type names."""
    found = []
    for name, path in _modules().items():
        if _part(name) == "adapters":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in FAMILY_NAMES:
                found.append(f"{name}: {node.value!r}")
    assert not found, found


def test_public_names_exist():
    """Every ``__all__`` lists names the module really has."""
    import importlib

    missing = []
    for name in _modules():
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name.removesuffix(".__init__"))
        missing += [f"{name}.{n}" for n in getattr(module, "__all__", []) if not hasattr(module, n)]
    assert not missing, missing


def test_config_variant_names_are_the_variant_table():
    """config lists the variant names (it imports no pipeline module); the table in pipeline.variants defines them."""
    from hf_subprune.config import VARIANTS as names
    from hf_subprune.pipeline.variants import VARIANTS as table

    assert names == tuple(table)
