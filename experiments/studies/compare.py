"""A table and the loss curves of several runs (`python -m experiments compare`, and the demo's)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from experiments.engine.evaluate import load_run_config
from quantlab.tables import markdown_table as markdown


def run_row(run_dir: Path) -> dict:
    """One run's line of the comparison, from its config.json, summary.json and eval.json."""
    config = load_run_config(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
    split = summary["time_split"]
    return {"run": run_dir.name, "method": config.method, "optimizer": config.optimizer,
            "state_bits": config.state_bits, "steps": summary["steps"], "final_loss": summary["mean_loss_last_10"],
            "knn_accuracy": evaluation.get("knn_accuracy"), "linear_accuracy": evaluation.get("linear_accuracy"),
            "optimizer_state_bytes": summary["optimizer_state_bytes"],
            "fraction_of_parameters_with_8bit_state": summary["fraction_of_parameters_with_8bit_state"],
            "data_ms_per_step": split["data_s"]["median_ms"], "model_ms_per_step": split["model_s"]["median_ms"],
            "optimizer_ms_per_step": split["optimizer_s"]["median_ms"], "wall_s": summary["elapsed_s"]}


COLUMNS = {"run": "run", "method": "method", "optimizer": "optimizer", "state_bits": "state bits",
           "knn_accuracy": "kNN", "linear_accuracy": "linear", "final_loss": "final loss",
           "optimizer_state_bytes": "optimizer state", "data_ms_per_step": "data ms/step",
           "model_ms_per_step": "model ms/step", "optimizer_ms_per_step": "optimizer ms/step", "wall_s": "wall s"}


def markdown_table(rows: list[dict]) -> str:
    return markdown(rows, list(COLUMNS), headers=COLUMNS, formats={
        "knn_accuracy": ".1%", "linear_accuracy": ".1%", "final_loss": ".3f",
        "optimizer_state_bytes": lambda b: f"{b / 2**10:.0f} KiB", "data_ms_per_step": ".0f",
        "model_ms_per_step": ".0f", "optimizer_ms_per_step": ".1f", "wall_s": ".0f"}) + "\n"


def plot_loss_curves(run_dirs: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run_dir in run_dirs:
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label=run_dir.name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_runs(run_dirs, out_dir, notes: str = "") -> list[dict]:
    """The table of runs (compare.md, .csv, .json) and their loss curves (loss_curves.png) in out_dir."""
    run_dirs = [Path(d) for d in run_dirs]
    if len({d.name for d in run_dirs}) < len(run_dirs):
        raise ValueError(f"run directories must have distinct names, got {[d.name for d in run_dirs]}")
    rows = [run_row(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(markdown_table(rows) + (f"\n{notes}\n" if notes else ""))
    (out_dir / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out_dir / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_loss_curves(run_dirs, out_dir / "loss_curves.png")
    return rows
