"""model/ is a leaf of the project: its modules import each other without cycles, and from the project only the two
layers below it (common/, tokenizer/ for writing a folder's tokenizer files). Checked on the source with ast, so a
cycle hidden in a function-level import counts too."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model"
PROJECT = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
ALLOWED_BELOW = {"common", "tokenizer"}
MODULES = sorted(p.stem for p in MODEL.glob("*.py") if p.stem != "__init__")


def imported(module: str) -> set[str]:
    """Dotted names `model/<module>.py` imports anywhere in its body (TYPE_CHECKING blocks included)."""
    tree = ast.parse((MODEL / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                base = "model" + (f".{node.module}" if node.module else "")
                if node.module is None:
                    names.update(f"model.{a.name}" for a in node.names)
                else:
                    names.add(base)
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def model_edges() -> dict[str, set[str]]:
    """module -> the model/ modules it imports (the package __init__ left out: it only re-exports)."""
    return {m: {n.split(".")[1] for n in imported(m) if n.startswith("model.") and n.split(".")[1] in MODULES} - {m}
            for m in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_inside_model():
    edges = model_edges()
    assert edges["rope"] == {"config"} and "hf" in edges["model"]  # the ast walk sees real edges
    assert find_cycle(edges) is None, f"import cycle in model/: {' -> '.join(find_cycle(edges))}"


def test_model_imports_nothing_above_it():
    above = {m: sorted(n for n in imported(m) if n.split(".")[0] in PROJECT - {"model"} | {"tests"}
                       and n.split(".")[0] not in ALLOWED_BELOW)
             for m in MODULES}
    assert {m: names for m, names in above.items() if names} == {}


@pytest.mark.parametrize("module", MODULES)
def test_every_model_module_imports_on_its_own(module):
    importlib.import_module(f"model.{module}")
