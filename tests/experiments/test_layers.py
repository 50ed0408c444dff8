"""The import direction of the project: experiments' layers import only downwards (see
experiments/__init__.py), the benchmarks import no other part of experiments, and quantlab imports
nothing of experiments."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"experiments.distributed": 0, "experiments.data": 1, "experiments.models": 2, "experiments.methods": 3,
          "experiments.lr_schedule": 3, "experiments.param_groups": 3, "experiments.eval": 4,
          "experiments.engine": 5, "experiments.studies": 6, "experiments.__main__": 7}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names, at any depth (function-level too)."""
    names = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def unit(module: str) -> str | None:
    """The layer unit (a key of LAYERS, or experiments.bench) a module belongs to."""
    for key in (*LAYERS, "experiments.bench"):
        if module == key or module.startswith(key + "."):
            return key
    return None


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def violations(module: str, imports: set[str]) -> list[str]:
    """What a module of experiments imports against the direction."""
    own, found = unit(module), []
    for imported in sorted(imports):
        target = unit(imported)
        if not imported.startswith("experiments.") or target == own:
            continue
        if own is None or own == "experiments.bench" or target in (None, "experiments.bench") \
                or LAYERS[target] >= LAYERS[own]:
            found.append(imported)
    return found


@pytest.mark.parametrize("path", python_files("experiments"), ids=lambda p: str(p.relative_to(ROOT)))
def test_experiments_import_only_downwards(path):
    assert violations(module_name(path), imported_modules(path)) == []


@pytest.mark.parametrize("path", python_files("quantlab"), ids=lambda p: str(p.relative_to(ROOT)))
def test_quantlab_imports_nothing_of_experiments(path):
    assert not [m for m in imported_modules(path) if m.split(".")[0] in ("experiments", "paper_figs")]


def test_the_check_sees_violations():
    assert violations("experiments.data.augment", {"experiments.engine.run"}) == ["experiments.engine.run"]
    assert violations("experiments.methods.moco", {"experiments.param_groups"}) == ["experiments.param_groups"]
    assert violations("experiments.bench.optim", {"experiments.data"}) == ["experiments.data"]
    bench = "experiments.bench.distributed"
    assert violations("experiments.eval.finetune", {bench}) == [bench]
    assert violations("experiments.engine.run", {"experiments.data", "experiments.engine.loop", "torch"}) == []
    assert "experiments.engine.run" in imported_modules(ROOT / "experiments" / "studies" / "demo.py")
