"""The package's layout rules (docs/architecture.md), checked on the source so that a change breaking one fails.

- arrows point down the layers: nothing above ``backends/`` imports one of its implementation modules
  (``_numba``, ``_numpy``, ``_cupy``); the data layer and ``lines`` import no model, engine or backend
  implementation; ``backends/`` imports nothing of the package but ``errors``;
- sizes: no module over 800 lines, no class over 500, no function over 150 (numba kernels that must stay
  one compiled function are listed with the reason).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cannon_bridge"
IMPLEMENTATIONS = ("_numba", "_numpy", "_cupy")
DATA_LAYER = ("io", "preprocess", "crossmatch", "datasets", "mock", "data", "spectrum", "lines", "bandlimit",
              "build")
MODELS = ("model", "bridge", "baselines", "engine")
#: functions allowed above 150 lines, and why
LONG_FUNCTIONS = {
    "_fit_fused": "one numba kernel call per tile runs every training pass (no Python between passes)",
}
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 800, 500, 150


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Absolute names of the package modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _name(path).split(".") if path.name == "__init__.py" else _name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("cannon_bridge"):
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cannon_bridge"))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_backend_implementation_is_imported_from_outside_backends(path):
    if _layer(_name(path)) == "backends":
        return
    bad = [m for m in _imports(path) if m.startswith("cannon_bridge.backends.")
           and m.split(".")[2] in IMPLEMENTATIONS]
    assert not bad, f"{_name(path)} imports {bad}: reach kernels through cannon_bridge.backends.get_backend"


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_the_data_layer_imports_no_model(path):
    if _layer(_name(path)) not in DATA_LAYER:
        return
    bad = [m for m in _imports(path) if _layer(m) in MODELS]
    assert not bad, f"{_name(path)} (data layer) imports {bad}"


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_backends_import_nothing_of_the_package_but_errors(path):
    if _layer(_name(path)) != "backends":
        return
    bad = [m for m in _imports(path) if _layer(m) not in ("backends", "errors")]
    assert not bad, f"{_name(path)} imports {bad}"


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_modules_classes_and_functions_stay_small(path):
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE, f"{_name(path)} has {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        length = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, ast.ClassDef):
            assert length <= MAX_CLASS, f"class {node.name} in {_name(path)} has {length} lines"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in LONG_FUNCTIONS:
            assert length <= MAX_FUNCTION, f"function {node.name} in {_name(path)} has {length} lines"


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_models_and_engine_import_no_files_figures_or_entry_points(path):
    layer = _layer(_name(path))
    if layer not in MODELS:
        return
    above = ("io", "plots", "cli", "scale", "distributed", "demo", "validation", "datasets")
    bad = [m for m in _imports(path) if _layer(m) in above]
    if layer == "engine":  # the engine sits below the models
        bad += [m for m in _imports(path) if _layer(m) in ("model", "bridge", "baselines")]
    assert not bad, f"{_name(path)} imports {bad}"
