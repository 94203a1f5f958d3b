"""The import layers the design settles (docs/design.md), read from the source (every import, function-level ones
included): no module imports a driver (only the command line does), the steps import no driver, the model package
knows nothing of training, evaluation or UI, objectives are pure, data does not reach up into objectives or recipes,
and a recipe does not import another recipe."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from medsynapse.recipes.registry import RECIPES

SOURCE = Path(__file__).resolve().parents[1] / "src"
DRIVERS = ("demo", "study")


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every medsynapse module `path` imports: `from a.b import c` counts as both `a.b` and `a.b.c`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in names if name.split(".")[0] == "medsynapse"}


def package(module: str) -> str:
    """The first level under medsynapse: `medsynapse.model.vlm` -> `model`, `medsynapse.study` -> `study`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {module_name(path): imported(path) for path in sorted((SOURCE / "medsynapse").rglob("*.py"))}


def offenders(where: str, forbidden: set[str]) -> list[str]:
    return sorted(f"{module} imports {name}" for module, names in GRAPH.items() if package(module) == where
                  for name in names if package(name) in forbidden)


def test_the_graph_is_read_from_the_source():
    assert "medsynapse.steps.prepare" in GRAPH["medsynapse.study"]  # a function-level import is seen
    assert "medsynapse.steps.synthmed" in GRAPH["medsynapse.demo"]
    assert len(GRAPH) > 70


def test_only_the_command_line_imports_a_driver():
    found = sorted(f"{module} imports {name}" for module, names in GRAPH.items() if package(module) != "cli"
                   for name in names if package(name) in DRIVERS and package(name) != package(module))
    assert found == []


@pytest.mark.parametrize(("where", "forbidden"), [
    ("steps", {*DRIVERS, "cli", "serve", "app"}),
    ("model", {"recipes", "objectives", "eval", "cli", "serve", "app", "steps", "runconfig", "values", "engines",
               *DRIVERS}),
    ("objectives", {"data", "model", "recipes", "eval", "cli", "runconfig", "steps", *DRIVERS}),
    ("data", {"objectives", "recipes", "eval", "cli", "runconfig", "steps", "serve", *DRIVERS}),
    ("recipes", {"eval", "cli", "serve", "app", "steps", *DRIVERS}),
    ("eval", {"recipes", "cli", "steps", "serve", "app", *DRIVERS}),
])
def test_a_lower_layer_does_not_import_a_higher_one(where, forbidden):
    assert offenders(where, forbidden) == []


def test_a_recipe_does_not_import_another_recipe():
    recipes = {f"medsynapse.recipes.{recipe.module}" for recipe in RECIPES.values()}
    found = sorted(f"{module} imports {name}" for module in recipes for name in GRAPH[module]
                   if name in recipes and name != module)
    assert len(recipes) >= 6 and found == []
