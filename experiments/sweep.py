"""Sweeps: every methods x optimizers x seeds combination as an independent run, filling the local cores.

    python -m experiments.sweep --out results/table1 --methods moco simclr --optimizers fp32 8bit \\
        --seeds 0 1 2 --workers 2 --set dataset=fashion-mnist --set epochs=2
    python -m experiments.sweep --out results/table1 ... --print-commands   # one shell line per run
    python -m experiments.sweep --out results/table1 ... --only 7           # just the 8th run of the plan

`--method-set METHOD:KEY=VALUE` applies to one method's runs only (mae:backbone=vit-tiny).

Each run is `python -m experiments pretrain` then `python -m experiments evaluate` into
OUT/runs/METHOD-OPTIMIZER-seedN, in a process of its own with torch threads = cores / workers; its
output goes to the run's log.txt. Evaluated runs are skipped and interrupted ones resumed, so
running the same command again completes a sweep. On a cluster, run the same command with
`--only $SLURM_ARRAY_TASK_ID --workers 1` as a SLURM array job of --print-commands' line count
(or hand those lines to GNU parallel, ...: each is independent), on a shared file system, then once
more with --table-only to build the table.

The table (OUT/table.md and table.json) has the shape of the paper's Table 1: per method and
optimizer the median over seeds of the k-NN and linear-probe accuracies with their spread (max -
min), and per method the median difference of each optimizer from fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

OPTIMIZER_PRESETS = {
    "fp32": ["--optimizer", "torch-adamw"],
    "8bit": ["--optimizer", "quantlab-adamw", "--state-bits", "8"],
    "quantlab-32bit": ["--optimizer", "quantlab-adamw", "--state-bits", "32"],
    "bnb-8bit": ["--optimizer", "bnb-adamw8bit"],
    # the paper's ablations of the 8-bit state: larger blocks, and a linear instead of the dynamic code
    "8bit-block2048": ["--optimizer", "quantlab-adamw", "--state-bits", "8", "--set", "block_size=2048"],
    "8bit-linear": ["--optimizer", "quantlab-adamw", "--state-bits", "8", "--set", "code=linear"],
}
# what eval.json may hold; with --eval-datasets each is named METRIC@DATASET
METRICS = {"knn_accuracy": "k-NN %", "linear_accuracy": "linear probe %", "linear_mean_auc": "linear probe mean AUC %",
           "finetune_mean_auc": "fine-tuned mean AUC %"}


def run_name(method: str, optimizer: str, seed: int) -> str:
    return f"{method}-{optimizer}-seed{seed}"


def method_overrides(texts: list[str]) -> dict[str, list[str]]:
    """METHOD:KEY=VALUE lines -> {method: [KEY=VALUE, ...]}."""
    overrides = {}
    for text in texts:
        method, sep, override = text.partition(":")
        if not sep or "=" not in override:
            raise ValueError(f"--method-set must read METHOD:KEY=VALUE, got {text!r}")
        overrides.setdefault(method, []).append(override)
    return overrides


def run_commands(run_dir: Path, method: str, optimizer: str, seed: int, overrides: list[str], threads: int,
                 evaluate_options: list[str] = (), eval_datasets: list[str] = ()):
    """The pretrain and evaluate command lines of one run (pretrain resumes an interrupted run): one
    evaluation on the run's own dataset, or one for each of eval_datasets."""
    python = [sys.executable, "-m", "experiments"]
    pretrain = [*python, "pretrain", "--method", method, *OPTIMIZER_PRESETS[optimizer], "--seed", str(seed),
                "--threads", str(threads), "--quiet", "--out", str(run_dir)]
    pretrain += [arg for text in overrides for arg in ("--set", text)]
    if (run_dir / "checkpoint.pt").exists():
        pretrain.append("--resume")
    evaluate = [*python, "evaluate", str(run_dir), *evaluate_options]
    return [pretrain] + ([[*evaluate, "--dataset", name] for name in eval_datasets] or [evaluate])


def execute(run_dir: Path, commands, threads: int) -> float:
    """Runs one run's commands (pretrain skipped once summary.json exists); returns seconds taken."""
    # Numba's parallel kernels get the run's share of the cores too, not all of them
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "a") as log:
        for command in commands:
            if command[3] == "pretrain" and (run_dir / "summary.json").exists():
                continue
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed with exit code {result.returncode}; see {run_dir}/log.txt")
    return time.perf_counter() - start


def run_result(run_dir: Path, eval_datasets: list[str] = ()) -> dict | None:
    """A finished run's numbers (metrics named METRIC@DATASET with eval_datasets), or None while an
    evaluation is missing."""
    def evaluation(dataset):
        own = json.loads((run_dir / "config.json").read_text())["dataset"] == dataset
        return run_dir / ("eval.json" if dataset is None or own else f"eval-{dataset}.json")

    if not (run_dir / "config.json").exists():  # not started
        return None
    files = {f"@{name}": evaluation(name) for name in eval_datasets} or {"": run_dir / "eval.json"}
    if not all(path.exists() for path in files.values()):
        return None
    result = {}
    for suffix, path in files.items():
        values = json.loads(path.read_text())
        result.update({key + suffix: values[key] for key in METRICS if key in values})
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**result, "optimizer_state_bytes": summary["optimizer_state_bytes"],
            "optimizer_ms_per_step": summary["time_split"]["optimizer_s"]["median_ms"],
            "model_ms_per_step": summary["time_split"]["model_s"]["median_ms"], "wall_s": summary["elapsed_s"]}


def metric_keys(runs: list[dict]) -> list[str]:
    """The metrics the runs hold (METRIC or METRIC@DATASET), in METRICS order."""
    keys = dict.fromkeys(key for run in runs for key in run
                         if key.partition("@")[0] in METRICS and not key.endswith(("_spread", "_minus_fp32")))
    return sorted(keys, key=lambda k: (list(METRICS).index(k.partition("@")[0]), k))


def summarize(runs: list[dict]) -> list[dict]:
    """Medians and spreads over seeds per (method, optimizer); differences of medians from fp32."""
    groups = {}
    for run in runs:
        groups.setdefault((run["method"], run["optimizer"]), []).append(run)
    rows = []
    for (method, optimizer), members in groups.items():
        row = {"method": method, "optimizer": optimizer, "seeds": sorted(r["seed"] for r in members)}
        for key in (*metric_keys(members), "optimizer_state_bytes", "optimizer_ms_per_step", "model_ms_per_step"):
            values = [r[key] for r in members]
            row[key] = statistics.median(values)
            row[f"{key}_spread"] = max(values) - min(values)
        rows.append(row)
    for row in rows:
        baseline = next((r for r in rows if r["method"] == row["method"] and r["optimizer"] == "fp32"), None)
        for key in metric_keys([row]):
            row[f"{key}_minus_fp32"] = None if baseline is None else row[key] - baseline[key]
    return rows


def metric_header(key: str) -> str:
    metric, _, dataset = key.partition("@")
    return METRICS[metric] + (f" on {dataset}" if dataset else "")


def markdown(rows: list[dict]) -> str:
    def cell(row, key):
        if key not in row:
            return "–"
        difference = row[f"{key}_minus_fp32"]
        text = f"{100 * row[key]:.1f} ± {100 * row[key + '_spread'] / 2:.1f}"
        return text + ("" if difference is None or row["optimizer"] == "fp32" else f" ({100 * difference:+.1f})")

    keys = metric_keys(rows)
    lines = ["| method | optimizer state | seeds | " + " | ".join(map(metric_header, keys)) +
             " | state KiB | optimizer ms/step | model ms/step |", "|---|---|---:|" + "---:|" * (len(keys) + 3)]
    for row in sorted(rows, key=lambda r: (r["method"], list(OPTIMIZER_PRESETS).index(r["optimizer"]))):
        lines.append(f"| {row['method']} | {row['optimizer']} | {len(row['seeds'])} | "
                     + "".join(f"{cell(row, key)} | " for key in keys)
                     + f"{row['optimizer_state_bytes'] / 2**10:.0f} | {row['optimizer_ms_per_step']:.1f} | "
                       f"{row['model_ms_per_step']:.0f} |")
    lines.append("\nMedians over seeds ± half the spread (max - min); in brackets the difference of medians from fp32, "
                 "in points.")
    return "\n".join(lines) + "\n"


def write_table(out: Path, plan, eval_datasets: list[str] = (), command: str = "") -> list[dict]:
    runs = []
    for method, optimizer, seed in plan:
        result = run_result(out / "runs" / run_name(method, optimizer, seed), eval_datasets)
        if result is not None:
            runs.append({"method": method, "optimizer": optimizer, "seed": seed, **result})
    rows = summarize(runs)
    (out / "table.json").write_text(json.dumps({"command": command, "runs": runs, "summary": rows}, indent=2))
    (out / "table.md").write_text(markdown(rows))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=["moco", "simclr"])
    parser.add_argument("--optimizers", nargs="+", default=["fp32", "8bit"], choices=list(OPTIMIZER_PRESETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every run's pretrain (see python -m experiments pretrain)")
    parser.add_argument("--method-set", dest="method_overrides", action="append", default=[],
                        metavar="METHOD:KEY=VALUE", help="like --set, for one method's runs only")
    parser.add_argument("--finetune", action="store_true", help="evaluate with fine-tuning too (evaluate --finetune)")
    parser.add_argument("--eval-datasets", nargs="+", default=[], metavar="DATASET",
                        help="evaluate on each of these instead of the pretraining dataset (the PASS protocol)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--only", type=int, nargs="+", metavar="INDEX",
                        help="run only these runs of the plan (0-based, in --print-commands order)")
    parser.add_argument("--print-commands", action="store_true", help="print each run's commands and exit")
    parser.add_argument("--table-only", action="store_true", help="build the table from finished runs")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    # seed outermost: a sweep stopped early still has whole seeds of every method and optimizer
    plan = [(m, o, s) for s in args.seeds for m in args.methods for o in args.optimizers]
    try:
        per_method = method_overrides(args.method_overrides)
    except ValueError as error:
        parser.error(str(error))
    if set(per_method) - set(args.methods):
        parser.error(f"--method-set names methods not in --methods: {sorted(set(per_method) - set(args.methods))}")
    if args.only is not None and not all(0 <= i < len(plan) for i in args.only):
        parser.error(f"--only indices must lie in 0..{len(plan) - 1}, got {args.only}")
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    evaluate_options = ["--finetune"] if args.finetune else []
    commands = {run: run_commands(args.out / "runs" / run_name(*run), *run, args.overrides + per_method.get(run[0], []),
                                  threads, evaluate_options, args.eval_datasets) for run in plan}
    if args.print_commands:
        for run in plan:
            print(" && ".join(" ".join(command) for command in commands[run]))
        return []
    args.out.mkdir(parents=True, exist_ok=True)
    failures = []
    if not args.table_only:
        chosen = plan if args.only is None else [plan[i] for i in args.only]
        todo = [run for run in chosen if run_result(args.out / "runs" / run_name(*run), args.eval_datasets) is None]
        print(f"{len(chosen) - len(todo)} of {len(chosen)} runs already evaluated; {len(todo)} to go on "
              f"{args.workers} workers x {threads} threads", flush=True)
        with ThreadPoolExecutor(args.workers) as pool:
            futures = {pool.submit(execute, args.out / "runs" / run_name(*run), commands[run], threads): run for run in todo}
            for done, future in enumerate(as_completed(futures), 1):
                name = run_name(*futures[future])
                try:
                    print(f"[{done}/{len(todo)}] {name} finished in {future.result():.0f} s", flush=True)
                except RuntimeError as error:
                    failures.append(name)
                    print(f"[{done}/{len(todo)}] {name} FAILED: {error}", flush=True)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "experiments.sweep", *(a for a in given if a != "--table-only")])
    rows = write_table(args.out, plan, args.eval_datasets, command)
    print(markdown(rows))
    print(f"saved {args.out}/table.md and table.json")
    if failures:
        sys.exit(f"{len(failures)} runs failed: {', '.join(failures)}")
    return rows


if __name__ == "__main__":
    main()
