"""Table: one optimizer step against torch, bitsandbytes and torchao: time, state and peak memory.

Reads results/bench_optim_single.json and bench_optim_models.json (either may be missing); writes
out/table_optim_speed.md.
"""
from __future__ import annotations

from pathlib import Path

from experiments.bench import optim as bench_optim

from .common import environment_line, run_one, save_text
from .optim_results import load_optim


def make(results: Path, out: Path) -> list[Path]:
    rows, checks, environments = load_optim(results)
    lines = bench_optim.table(rows).splitlines()
    if checks:
        lines += ["", "Non-finite gradient check per step (ms): " + "; ".join(
            f"{case}: quantlab {c['quantlab_check_ms']:.2f}, torch.isfinite().all() {c['torch_isfinite_all_ms']:.2f}"
            for case, c in checks.items())]
    lines += ["", "Source: paper_figs/results/bench_optim_*.json. "
              + " ".join(environment_line(env) for env in environments[:1])]
    return [save_text("\n".join(lines), Path(out) / "table_optim_speed.md")]


if __name__ == "__main__":
    run_one(make)
