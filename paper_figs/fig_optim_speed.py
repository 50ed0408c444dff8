"""Figure: time per optimizer step (left) and optimizer memory per parameter (right), per model.

Reads results/bench_optim_single.json and bench_optim_models.json (either may be missing); writes
out/fig_optim_speed.png.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import pyplot, run_one, save_figure
from .optim_results import cases, load_optim


def make(results: Path, out: Path) -> list[Path]:
    rows, _, environments = load_optim(results)
    case_names = cases(rows)
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    by = {(r["case"], r["optimizer"]): r for r in rows}
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 1.2 + 0.25 * len(optimizers) * len(case_names)))
    height = 0.8 / len(case_names)
    y = np.arange(len(optimizers))
    for i, case in enumerate(case_names):
        present = [k for k, o in enumerate(optimizers) if (case, o) in by]
        offsets = y[present] + (i - (len(case_names) - 1) / 2) * height
        r = [by[case, optimizers[k]] for k in present]
        label = f"{case} ({r[0]['params'] / 1e6:.1f} M)"
        left.barh(offsets, [x["ms_per_step"] for x in r], height, color=f"C{i}", label=label)
        right.barh(offsets, [x["state_bytes_per_param"] for x in r], height, color=f"C{i}", label=label)
        right.barh(offsets, [x["peak_extra_bytes_per_param"] for x in r], height,
                   left=[x["state_bytes_per_param"] for x in r], color=f"C{i}", alpha=0.35)
    for ax in (left, right):
        ax.set_yticks(y, optimizers)
        ax.invert_yaxis()
    left.set(xscale="log", xlabel="ms per step (log scale)", title="time per step")
    right.set(xlabel="bytes per parameter", title="optimizer state (solid) + peak extra during a step (light)")
    right.set_yticklabels([])
    right.legend(fontsize=8, loc="lower right")
    env = environments[0] if environments else {}
    fig.suptitle(f"One Adam step on the CPU ({env.get('cpu', 'CPU')}, {env.get('numba_threads', '?')} threads, "
                 f"torch {env.get('torch', '?')})", fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, Path(out) / "fig_optim_speed.png")]


if __name__ == "__main__":
    run_one(make)
