"""The demo: MoCo v2 pretrained with float32 AdamW and with 8-bit AdamW, same seed and settings, on the
embedded Fashion-MNIST subset (5000 train / 1000 test images), then compared by k-NN and linear-probe
accuracy, optimizer-state bytes and step time.

    python -m experiments demo                 # about 4 minutes on 2 otherwise idle CPU cores
    python -m experiments demo --quick         # seconds: the same pipeline at toy sizes

Writes a run directory per optimizer and compare.md / .csv / .json and loss_curves.png under --out.
compare_runs also backs `python -m experiments compare`.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import time
from pathlib import Path

from experiments.config import load_config
from experiments.train import build_method, evaluate_backbone, evaluate_run, load_run_config, pretrain

# MoCo v2 for a short run: a queue of 8 batches and momentum 0.99 (the paper's 65536 and 0.999 suit 200 epochs)
DEMO_SETTINGS = {"method": "moco", "backbone": "resnet-tiny", "dataset": "fashion-mnist-subset", "seed": 0,
                 "epochs": 8, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4, "warmup_epochs": 0.5,
                 "method_options": {"queue_size": 1024, "momentum": 0.99}, "checkpoint_every": 0}
QUICK_SETTINGS = {**DEMO_SETTINGS, "epochs": 1, "train_subset": 32, "batch_size": 16, "threads": 1,
                  "method_options": {"queue_size": 64}, "eval_subset": 100, "knn_k": 5, "probe_epochs": 5}
OPTIMIZER_RUNS = {"torch-adamw-fp32": {"optimizer": "torch-adamw"},
                  "quantlab-adamw-8bit": {"optimizer": "quantlab-adamw", "state_bits": 8},
                  "bnb-adamw8bit": {"optimizer": "bnb-adamw8bit"}}


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


def markdown_table(rows: list[dict]) -> str:
    def percent(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = ["| run | method | optimizer | state bits | kNN | linear | final loss | optimizer state | "
             "data ms/step | model ms/step | optimizer ms/step | wall s |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {r['optimizer']} | {r['state_bits']} | "
                     f"{percent(r['knn_accuracy'])} | {percent(r['linear_accuracy'])} | {r['final_loss']:.3f} | "
                     f"{r['optimizer_state_bytes'] / 2**10:.0f} KiB | {r['data_ms_per_step']:.0f} | "
                     f"{r['model_ms_per_step']:.0f} | {r['optimizer_ms_per_step']:.1f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


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


def demo(out_dir="results/demo", quick: bool = False) -> list[dict]:
    """Pretrain and evaluate one run per optimizer (bitsandbytes' when installed), then compare them."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    settings = QUICK_SETTINGS if quick else DEMO_SETTINGS
    names = [name for name, options in OPTIMIZER_RUNS.items()
             if options["optimizer"] != "bnb-adamw8bit" or importlib.util.find_spec("bitsandbytes") is not None]
    for name in names:
        print(f"== {name}", flush=True)
        pretrain(load_config(settings, OPTIMIZER_RUNS[name]), out_dir / name, overwrite=True)
        evaluate_run(out_dir / name)
    config = load_config(settings)
    untrained = evaluate_backbone(build_method(config).backbone, config)  # what pretraining has to beat
    (out_dir / "untrained_eval.json").write_text(json.dumps(untrained, indent=2) + "\n")
    total_s = time.perf_counter() - started
    eight_bit = run_row(out_dir / "quantlab-adamw-8bit")["fraction_of_parameters_with_8bit_state"]
    notes = (f"The untrained backbone (same seed): kNN {100 * untrained['knn_accuracy']:.1f}%, linear "
             f"{100 * untrained['linear_accuracy']:.1f}%.\n\n"
             f"Total demo time (pretraining and evaluation of {len(names)} runs): {total_s:.0f} s. Optimizer "
             f"state bytes count every tensor in optimizer.state: the 8-bit optimizers keep float32 states for "
             f"tensors under min_8bit_size elements, so {100 * eight_bit:.1f}% of the parameters have 8-bit "
             f"states. ms/step are medians over steps; the first step of each run also loads or compiles kernels.")
    rows = compare_runs([out_dir / name for name in names], out_dir, notes)
    print(markdown_table(rows))
    print(notes)
    return rows
