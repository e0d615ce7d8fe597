"""The package's floor plan (README, "Architecture"): every import points down, never up.

Read from the source with `ast` (imports inside functions and `TYPE_CHECKING` blocks count too),
so a new module is checked the moment it exists.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_prune"

# Bottom to top. A unit is a top-level module or sub-package of lightning_prune ("" is the package's
# own __init__, the public API). A unit may import its own floor (no circle) and the floors below.
FLOORS: list[set[str]] = [
    {"validation", "registry", "targets", "selection", "schedules", "criteria"},  # pure PyTorch core
    {"parallel"},  # torch.distributed: collectives, sharded selection
    {"masking", "mask_updates", "report"},  # masks in the forward pass, scores to masks, sparsity tables
    {"calibration"},  # the block driver and its statistics
    {"oneshot", "structured", "recovery", "lora", "export", "evaluate"},  # the features
    {"callbacks"},  # Lightning adapters
    {"models", "data"},  # examples of users' code
    {"run", "cli", ""},  # the pipeline, the entry point, the public API
]
PURE_CORE = {
    "validation",
    "registry",
    "targets",
    "selection",
    "schedules",
    "criteria",
    "masking",
    "mask_updates",
    "parallel",
}
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf")


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports() -> dict[str, set[str]]:
    """{module path relative to the package: every absolute module name it imports}."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: relative import; the package imports by absolute name")
        found[str(path.relative_to(PACKAGE.parent))] = names
    return found


def _floor(unit: str) -> int:
    (index,) = [i for i, units in enumerate(FLOORS) if unit in units]
    return index


def _unit_of_path(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return "" if len(parts) == 2 and parts[1] == "__init__" else parts[1]


def test_every_unit_has_a_floor() -> None:
    units = {_unit_of_path(path) for path in _imports()}
    assert units == set().union(*FLOORS), f"units without a floor: {units - set().union(*FLOORS)}"


def test_imports_point_down() -> None:
    upward = []
    for path, names in _imports().items():
        unit = _unit_of_path(path)
        for name in names:
            if name.startswith("lightning_prune.") and _floor(_unit(name)) > _floor(unit):
                upward.append(f"{path} imports {name}")
    assert not upward, "\n".join(upward)


def test_calibration_imports_no_feature() -> None:
    features = ("oneshot", "structured", "recovery", "callbacks", "run", "lora", "export")
    bad = [
        f"{path}: {name}"
        for path, names in _imports().items()
        if path.startswith("lightning_prune/calibration/")
        for name in names
        if name.startswith("lightning_prune.") and _unit(name) in features
    ]
    assert not bad


def test_pure_core_imports_no_framework() -> None:
    bad = [
        f"{path}: {name}"
        for path, names in _imports().items()
        if _unit_of_path(path) in PURE_CORE
        for name in names
        if name.split(".")[0] in FRAMEWORKS
    ]
    assert not bad


def test_units_of_one_floor_form_no_circle() -> None:
    edges: dict[str, set[str]] = {}
    for path, names in _imports().items():
        unit = _unit_of_path(path)
        for name in names:
            if name.startswith("lightning_prune.") and _unit(name) != unit:
                edges.setdefault(unit, set()).add(_unit(name))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    circles = sorted(unit for unit in edges if reaches(unit, unit, {unit}))
    assert not circles, f"units that import themselves through others: {circles}"
