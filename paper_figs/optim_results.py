"""The recorded optimizer benchmarks (bench_optim_*.json), shared by fig_optim_speed and table_optim_speed."""
from __future__ import annotations

from pathlib import Path

from .common import Skip, load

FILES = ("bench_optim_single.json", "bench_optim_models.json")
RECORD = "python -m experiments.bench.optim --out results/bench_optim, then copy its JSON to paper_figs/results/"


def load_optim(results: Path) -> tuple[list[dict], dict, list[dict]]:
    """(rows, nonfinite checks by case, [environment per file]) from whichever files exist."""
    rows, checks, environments, missing = [], {}, [], []
    for name in FILES:
        try:
            result = load(results, name, RECORD)
        except Skip as why:
            missing.append(str(why))
            continue
        rows += result.get("rows", [])
        checks.update(result.get("nonfinite_check", {}))
        environments.append(result.get("environment", {}))
    if not rows:
        raise Skip("; ".join(missing) or "no optimizer benchmark rows")
    for why in missing:
        print(f"note: {why}")
    return rows, checks, environments


def cases(rows) -> list[str]:
    return list(dict.fromkeys(r["case"] for r in rows))
