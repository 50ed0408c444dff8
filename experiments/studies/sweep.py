"""Sweeps: every methods x optimizers x seeds combination as an independent run, filling the local cores.

    python -m experiments.studies.sweep --out results/table1 --methods moco simclr --optimizers fp32 8bit \\
        --seeds 0 1 2 --workers 2 --set dataset=fashion-mnist --set epochs=2
    python -m experiments.studies.sweep --out results/table1 ... --print-commands   # one shell line per run
    python -m experiments.studies.sweep --out results/table1 ... --only 7           # just the 8th run of the plan

`--method-set METHOD:KEY=VALUE` applies to one method's runs only (mae:backbone=vit-tiny). In code a sweep
is a `Sweep` (what the protocols in protocols.py are made of); the command line builds one.

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
from dataclasses import dataclass, field
from pathlib import Path

from experiments.engine.config import merge, parse_override
from quantlab.tables import markdown_table

# the optimizer of a run, as RunConfig settings
OPTIMIZER_PRESETS = {
    "fp32": {"optimizer": "torch-adamw"},
    "8bit": {"optimizer": "quantlab-adamw", "state_bits": 8},
    "quantlab-32bit": {"optimizer": "quantlab-adamw", "state_bits": 32},
    "bnb-8bit": {"optimizer": "bnb-adamw8bit"},
    # the paper's ablations of the 8-bit state: larger blocks, and a linear instead of the dynamic code
    "8bit-block2048": {"optimizer": "quantlab-adamw", "state_bits": 8, "block_size": 2048},
    "8bit-linear": {"optimizer": "quantlab-adamw", "state_bits": 8, "code": "linear"},
    # 4-bit states: Li et al.'s (quantlab.optim.FOUR_BIT) and torchao's AdamW4bit
    "4bit": {"optimizer": "quantlab-adamw", "state_bits": 4, "block_size": 128, "unsigned_code": "linear-zero-free",
             "unsigned_normalization": "rank1"},
    "torchao-4bit": {"optimizer": "torchao-adamw", "state_bits": 4, "block_size": 128},
}
# what eval.json may hold; with eval_datasets each is named METRIC@DATASET
METRICS = {"knn_accuracy": "k-NN %", "linear_accuracy": "linear probe %", "linear_mean_auc": "linear probe mean AUC %",
           "finetune_mean_auc": "fine-tuned mean AUC %"}


@dataclass(frozen=True)
class Sweep:
    """methods x optimizers (OPTIMIZER_PRESETS names) x seeds, each run with `settings` (RunConfig keys,
    nested tables merging key by key) and its method's `method_settings`, evaluated on its own dataset or
    on each of `eval_datasets`, with fine-tuning when `finetune`."""
    methods: tuple[str, ...] = ("moco", "simclr")
    optimizers: tuple[str, ...] = ("fp32", "8bit")
    seeds: tuple[int, ...] = (0, 1, 2)
    settings: dict = field(default_factory=dict)
    method_settings: dict = field(default_factory=dict)
    eval_datasets: tuple[str, ...] = ()
    finetune: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.optimizers) - set(OPTIMIZER_PRESETS))
        if unknown:
            raise ValueError(f"unknown optimizer presets {unknown}; choose from {list(OPTIMIZER_PRESETS)}")
        stray = sorted(set(self.method_settings) - set(self.methods))
        if stray:
            raise ValueError(f"method settings name methods not in the sweep: {stray}")

    def plan(self) -> list[tuple[str, str, int]]:
        """(method, optimizer, seed) of every run; seed outermost, so that a sweep stopped early still has
        whole seeds of every method and optimizer."""
        return [(m, o, s) for s in self.seeds for m in self.methods for o in self.optimizers]

    def run_settings(self, method: str, optimizer: str, seed: int) -> dict:
        """The RunConfig settings of one run."""
        settings = merge({"method": method, "seed": seed}, OPTIMIZER_PRESETS[optimizer])
        return merge(merge(settings, self.settings), self.method_settings.get(method, {}))

    def commands(self, run_dir: Path, method: str, optimizer: str, seed: int, threads: int) -> list[list[str]]:
        """The pretrain and evaluate command lines of one run (pretrain resumes an interrupted run): one
        evaluation on the run's own dataset, or one for each of eval_datasets."""
        python = [sys.executable, "-m", "experiments"]
        pretrain = [*python, "pretrain", "--threads", str(threads), "--quiet", "--out", str(run_dir)]
        overrides = override_texts(self.run_settings(method, optimizer, seed))
        pretrain += [arg for text in overrides for arg in ("--set", text)]
        if (run_dir / "checkpoint.pt").exists():
            pretrain.append("--resume")
        evaluate = [*python, "evaluate", str(run_dir), *(["--finetune"] if self.finetune else [])]
        return [pretrain] + ([[*evaluate, "--dataset", name] for name in self.eval_datasets] or [evaluate])

    def arguments(self) -> list[str]:
        """The command-line arguments of this sweep (python -m experiments.studies.sweep ARGUMENTS)."""
        arguments = ["--methods", *self.methods, "--optimizers", *self.optimizers, "--seeds", *map(str, self.seeds)]
        arguments += [arg for text in override_texts(self.settings) for arg in ("--set", text)]
        arguments += [arg for method, settings in self.method_settings.items()
                      for text in override_texts(settings) for arg in ("--method-set", f"{method}:{text}")]
        if self.eval_datasets:
            arguments += ["--eval-datasets", *self.eval_datasets]
        return arguments + (["--finetune"] if self.finetune else [])


def override_texts(settings: dict, prefix: str = "") -> list[str]:
    """Nested settings as KEY=VALUE texts that engine.config.parse_override reads back: nested keys
    joined by dots, values as compact JSON, strings bare where that reads back the same."""
    texts = []
    for key, value in settings.items():
        if isinstance(value, dict):
            texts += override_texts(value, f"{prefix}{key}.")
            continue
        text = json.dumps(value, separators=(",", ":"))
        if isinstance(value, str) and parse_override(f"x={value}")["x"] == value:
            text = value
        texts.append(f"{prefix}{key}={text}")
    return texts


def run_name(method: str, optimizer: str, seed: int) -> str:
    return f"{method}-{optimizer}-seed{seed}"


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
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            if result.returncode != 0:
                raise RuntimeError(f"{shlex.join(command)} failed with exit code {result.returncode}; "
                                   f"see {run_dir}/log.txt")
    return time.perf_counter() - start


def execute_all(jobs: dict[str, tuple[Path, list]], workers: int, threads: int) -> list[str]:
    """Runs every job (name -> (run directory, its commands)) with `execute`, `workers` at a time, printing
    each as it ends; returns the names of those that failed."""
    failures = []
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(execute, run_dir, commands, threads): name for name, (run_dir, commands) in jobs.items()}
        for done, future in enumerate(as_completed(futures), 1):
            try:
                print(f"[{done}/{len(jobs)}] {futures[future]} finished in {future.result():.0f} s", flush=True)
            except RuntimeError as error:
                failures.append(futures[future])
                print(f"[{done}/{len(jobs)}] {futures[future]} FAILED: {error}", flush=True)
    return failures


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
    """The sweep's table: per method and optimizer, each metric's median ± half its spread over seeds and,
    beside fp32, the difference of medians from fp32 in brackets."""
    def cell(row, key):
        if key not in row:
            return None
        difference = row[f"{key}_minus_fp32"]
        text = f"{100 * row[key]:.1f} ± {100 * row[key + '_spread'] / 2:.1f}"
        return text + ("" if difference is None or row["optimizer"] == "fp32" else f" ({100 * difference:+.1f})")

    keys = metric_keys(rows)
    ordered = sorted(rows, key=lambda r: (r["method"], list(OPTIMIZER_PRESETS).index(r["optimizer"])))
    cells = [{**row, "seeds": len(row["seeds"]), **{key: cell(row, key) for key in keys}} for row in ordered]
    headers = {"optimizer": "optimizer state", **{key: metric_header(key) for key in keys},
               "optimizer_state_bytes": "state KiB", "optimizer_ms_per_step": "optimizer ms/step",
               "model_ms_per_step": "model ms/step"}
    columns = ["method", "optimizer", "seeds", *keys, "optimizer_state_bytes", "optimizer_ms_per_step",
               "model_ms_per_step"]
    table = markdown_table(cells, columns, headers=headers, align=dict.fromkeys(keys, "right"), formats={
        "optimizer_state_bytes": lambda b: f"{b / 2**10:.0f}", "optimizer_ms_per_step": ".1f",
        "model_ms_per_step": ".0f"}) if rows else "(no finished runs yet)"
    return (table + "\n\nMedians over seeds ± half the spread (max - min); in brackets the difference of medians "
            "from fp32, in points.\n")


def write_table(out: Path, sweep: Sweep, command: str = "") -> list[dict]:
    runs = []
    for method, optimizer, seed in sweep.plan():
        result = run_result(out / "runs" / run_name(method, optimizer, seed), sweep.eval_datasets)
        if result is not None:
            runs.append({"method": method, "optimizer": optimizer, "seed": seed, **result})
    rows = summarize(runs)
    (out / "table.json").write_text(json.dumps({"command": command, "runs": runs, "summary": rows}, indent=2))
    (out / "table.md").write_text(markdown(rows))
    return rows


def run(sweep: Sweep, out: Path, workers: int = os.cpu_count() or 1, only: list[int] | None = None,
        table_only: bool = False) -> list[dict]:
    """Runs what is not evaluated yet of the sweep (or of the runs `only` names, by plan index) on
    `workers` processes, then writes and returns its table."""
    plan = sweep.plan()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if only is not None and not all(0 <= i < len(plan) for i in only):
        raise ValueError(f"run indices must lie in 0..{len(plan) - 1}, got {only}")
    threads = max(1, (os.cpu_count() or 1) // workers)
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    if not table_only:
        chosen = plan if only is None else [plan[i] for i in only]
        todo = [r for r in chosen if run_result(out / "runs" / run_name(*r), sweep.eval_datasets) is None]
        print(f"{len(chosen) - len(todo)} of {len(chosen)} runs already evaluated; {len(todo)} to go on "
              f"{workers} workers x {threads} threads", flush=True)
        failures = execute_all({run_name(*r): (out / "runs" / run_name(*r),
                                               sweep.commands(out / "runs" / run_name(*r), *r, threads)) for r in todo},
                               workers, threads)
    command = shlex.join(["python", "-m", "experiments.studies.sweep", "--out", str(out), *sweep.arguments()])
    rows = write_table(out, sweep, command)
    print(markdown(rows))
    print(f"saved {out}/table.md and table.json")
    if failures:
        sys.exit(f"{len(failures)} runs failed: {', '.join(failures)}")
    return rows


def sweep_from_arguments(args) -> Sweep:
    settings = {}
    for text in args.overrides:
        settings = merge(settings, parse_override(text))
    method_settings = {}
    for text in args.method_overrides:
        method, sep, override = text.partition(":")
        if not sep or "=" not in override:
            raise ValueError(f"--method-set must read METHOD:KEY=VALUE, got {text!r}")
        method_settings[method] = merge(method_settings.get(method, {}), parse_override(override))
    return Sweep(tuple(args.methods), tuple(args.optimizers), tuple(args.seeds), settings, method_settings,
                 tuple(args.eval_datasets), args.finetune)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=list(Sweep.methods))
    parser.add_argument("--optimizers", nargs="+", default=list(Sweep.optimizers), choices=list(OPTIMIZER_PRESETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(Sweep.seeds))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a RunConfig setting of every run (see python -m experiments pretrain)")
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
    try:
        sweep = sweep_from_arguments(args)
        if args.only is not None and not all(0 <= i < len(sweep.plan()) for i in args.only):
            raise ValueError(f"--only indices must lie in 0..{len(sweep.plan()) - 1}, got {args.only}")
        if args.print_commands:
            print_commands(sweep, args.out, args.workers)
            return []
        return run(sweep, args.out, args.workers, args.only, args.table_only)
    except ValueError as error:
        parser.error(str(error))


def print_commands(sweep: Sweep, out: Path, workers: int | None = None) -> None:
    """One shell line per run, in plan order (what --only indexes)."""
    threads = max(1, (os.cpu_count() or 1) // (workers or os.cpu_count() or 1))
    for r in sweep.plan():
        print(" && ".join(shlex.join(c) for c in sweep.commands(out / "runs" / run_name(*r), *r, threads)))


if __name__ == "__main__":
    main()
