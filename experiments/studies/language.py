"""The language-model studies: grids of LMConfig cells x seeds, each run an independent
`python -m experiments lm-train` process (engine/language_model.py), filling the local cores.

    python -m experiments.studies.language lr-sweep  --out results/lm   # 32-bit Adam over learning rates
    python -m experiments.studies.language stability --out results/lm   # the paper's Table 3
    python -m experiments.studies.language stability-moderate-lr --out results/lm   # the same at lr / 4
    python -m experiments.studies.language table1    --out results/lm   # 8- vs 32-bit AdamW, Lion, SGD
    python -m experiments.studies.language four-bit  --out results/lm   # 4-bit AdamW states (Li et al. 2023)
    python -m experiments.studies.language state-bits --out results/lm  # 2..8-bit states by code
    ... --seeds 0 1 2 --workers 2 --print-commands --table-only

Each study writes OUT/STUDY/runs/CELL-seedN and OUT/STUDY/record.json (every run's summary, stability
verdict and validation curve, and the per-cell table), table.md and curves.png. Finished runs are
skipped and interrupted ones resumed, so running the same command again completes a study; a study
stopped early still has whole seeds of every cell (seed is the outer loop).
`python -m paper_figs.record_lm OUT/STUDY/record.json` files a record under paper_figs/results/.

A run is *unstable*, decided before any run was made, when (1) its loss or gradient became non-finite,
(2) its final validation loss is not below the unigram baseline (byte frequencies: a model that learned
nothing else), or (3) its training loss spiked: the mean over 10 steps rose SPIKE_NATS above the lowest
earlier such mean.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments.engine.config import merge
from experiments.studies.sweep import execute_all, override_texts
from quantlab.tables import markdown_table

SPIKE_NATS = 0.5
SPIKE_WINDOW = 10

# nanoGPT's CPU run of character-level Shakespeare (4 layers, width 128, context 64, batch 12, 2000 steps,
# AdamW lr 1e-3 with betas (0.9, 0.99), weight decay 0.1, gradient clipping at 1): about 2.5 minutes on one core
RECIPE = {}
# the stability study's size: 2 layers of width 64, 1000 steps of 16 windows, about 20 s a run on one core
SMALL = {"width": 64, "depth": 2, "heads": 4, "batch_size": 16, "steps": 1000, "warmup_steps": 50,
         "eval_every": 100, "eval_tokens": 16384, "checkpoint_every": 0}
# the paper's Table 3 optimizers: Adam (no weight decay) with 32-bit states, or 8-bit states of either code
# in blocks of 256 or in one block a tensor
STABILITY_OPTIMIZERS = {
    "32-bit Adam": {"library": "torch"},
    "8-bit dynamic, blocks of 256": {"code": "dynamic", "block_size": 256},
    "8-bit dynamic, one block a tensor": {"code": "dynamic", "block_size": 0},
    "8-bit linear, blocks of 256": {"code": "linear", "block_size": 256},
    "8-bit linear, one block a tensor": {"code": "linear", "block_size": 0},
}
STABILITY_LR = 1.6e-2  # from lr-sweep: the largest lr within 0.05 nats of the best 32-bit loss (2x more degrades it)
LR_SWEEP = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)
# Lion: a 3x smaller lr and 10x larger weight decay than AdamW (Chen et al. 2023 suggest 3-10x); SGD: lr 0.5.
# Both chosen by 600-step trials at the recipe's size: Lion lr 3e-4 2.35 nats vs 1e-4 2.65, SGD 0.5 2.42 vs 2.0 3.31
TABLE1_OPTIMIZERS = {
    "AdamW 32-bit (torch)": {"library": "torch", "algorithm": "adamw"},
    "AdamW 8-bit": {"algorithm": "adamw"},
    "AdamW 8-bit (bitsandbytes)": {"library": "bitsandbytes", "algorithm": "adamw"},
    "Lion 32-bit": {"algorithm": "lion", "state_bits": 32, "lr": 3e-4, "weight_decay": 1.0},
    "Lion 8-bit": {"algorithm": "lion", "lr": 3e-4, "weight_decay": 1.0},
    "SGD-momentum 32-bit (torch)": {"library": "torch", "algorithm": "sgd", "lr": 0.5, "weight_decay": 0.0},
    "SGD-momentum 8-bit": {"algorithm": "sgd", "lr": 0.5, "weight_decay": 0.0},
}
# "Memory Efficient Optimizers with 4-bit States" (Li, Chen and Zhu 2023): quantlab.optim.FOUR_BIT (4-bit m in
# blocks of 128, 4-bit v under rank-1 normalisation in the zero-free linear code), its parts, and torchao's
# AdamW4bit (zero-free linear v in blocks of 128, no rank-1), beside 8- and 32-bit states
FOUR_BIT = {"state_bits": 4, "block_size": 128, "unsigned_code": "linear-zero-free", "unsigned_normalization": "rank1"}
FOUR_BIT_OPTIMIZERS = {
    "AdamW 32-bit (torch)": {"library": "torch"},
    "AdamW 8-bit": {},
    "AdamW 4-bit, rank-1 zero-free v (Li et al.)": FOUR_BIT,
    "AdamW 4-bit, zero-free v in blocks of 128": {**FOUR_BIT, "unsigned_normalization": "blockwise"},
    "AdamW 4-bit dynamic codes (v code with 0)": {"state_bits": 4, "block_size": 128},
    "AdamW 4-bit (torchao AdamW4bit)": {"library": "torchao", "state_bits": 4, "block_size": 128},
}
# state widths by v's code, at the stability study's size and its moderate lr (where 8-bit dynamic is stable)
STATE_BITS = (2, 3, 4, 5, 6, 7, 8)
STATE_BIT_CODES = {
    "dynamic": {},
    "linear": {"code": "linear"},
    "zero-free linear v": {"unsigned_code": "linear-zero-free"},
    "zero-free linear v, rank-1": {"unsigned_code": "linear-zero-free", "unsigned_normalization": "rank1"},
}


@dataclass(frozen=True)
class Study:
    """cells (label -> LMConfig settings) x seeds, every run with `settings` under its cell's."""
    name: str
    what: str  # the question and the setup, one paragraph
    cells: dict[str, dict]
    seeds: tuple[int, ...] = (0, 1, 2)
    settings: dict = field(default_factory=dict)

    def plan(self) -> list[tuple[str, int]]:
        return [(cell, seed) for seed in self.seeds for cell in self.cells]

    def run_settings(self, cell: str, seed: int) -> dict:
        return merge(merge(self.settings, self.cells[cell]), {"seed": seed})


def stability_study(seeds=tuple(range(10)), lr: float = STABILITY_LR, name: str = "stability") -> Study:
    cells = {f"{optimizer} / {embedding}": {**settings, "embedding": embedding}
             for embedding in ("standard", "stable") for optimizer, settings in STABILITY_OPTIMIZERS.items()}
    edge = f"{STABILITY_LR / lr:g}x below " if lr != STABILITY_LR else ""
    return Study(name, f"The paper's Table 3 at a small size: Adam at lr {lr:g} ({edge}the edge of 32-bit stability, "
                 "lr-sweep), 32-bit states or 8-bit of either code in blocks of 256 or one block a tensor, with "
                 "torch's embedding or StableEmbedding.", cells, tuple(seeds),
                 {**SMALL, "algorithm": "adam", "weight_decay": 0.0, "lr": lr})


def moderate_stability_study(seeds=tuple(range(5))) -> Study:
    """The same grid at a 4x smaller lr: does a code that fails at the edge fail at a gentle lr too?"""
    return stability_study(seeds, STABILITY_LR / 4, "stability-moderate-lr")


def lr_sweep_study(seeds=(0, 1)) -> Study:
    cells = {f"lr {lr:g}": {"lr": lr} for lr in LR_SWEEP}
    return Study("lr-sweep", "32-bit Adam (torch) at the stability study's size over learning rates: the "
                 "stability study runs at the largest one where 32-bit Adam is stable in every seed.", cells,
                 tuple(seeds), {**SMALL, "algorithm": "adam", "weight_decay": 0.0, "library": "torch"})


def table1_study(seeds=(0, 1, 2)) -> Study:
    return Study("table1", "Language modelling row of the paper's Table 1: nanoGPT's CPU recipe (4 layers of "
                 "width 128, 2000 steps) with 8-bit vs 32-bit states for AdamW, Lion and SGD with momentum 0.9, "
                 "and bitsandbytes' AdamW8bit.", dict(TABLE1_OPTIMIZERS), tuple(seeds), dict(RECIPE))


def four_bit_study(seeds=(0, 1, 2)) -> Study:
    return Study("four-bit", "4-bit AdamW states at nanoGPT's CPU recipe (4 layers of width 128, 2000 steps): Li et "
                 "al.'s recipe (quantlab.optim.FOUR_BIT: m in blocks of 128, v under rank-1 normalisation in the "
                 "zero-free linear code), v in blocks of 128 instead, 4-bit dynamic codes (v's holds 0), torchao's "
                 "AdamW4bit, against 8- and 32-bit states.", dict(FOUR_BIT_OPTIMIZERS), tuple(seeds), dict(RECIPE))


def state_bits_study(seeds=(0, 1)) -> Study:
    cells = {"32-bit Adam": {"library": "torch"}}
    cells.update({f"{bits}-bit, {name}": {"state_bits": bits, "block_size": 128, **settings}
                  for name, settings in STATE_BIT_CODES.items() for bits in STATE_BITS})
    return Study("state-bits", f"Adam with 2- to 8-bit states in blocks of 128 at the stability study's size and "
                 f"its moderate lr {STABILITY_LR / 4:g}: the dynamic codes, the linear codes, the dynamic m with the "
                 f"zero-free linear v, and that v under rank-1 normalisation.", cells, tuple(seeds),
                 {**SMALL, "algorithm": "adam", "weight_decay": 0.0, "lr": STABILITY_LR / 4})


STUDIES = {"lr-sweep": lr_sweep_study, "stability": stability_study, "stability-moderate-lr": moderate_stability_study,
           "table1": table1_study, "four-bit": four_bit_study, "state-bits": state_bits_study}


def run_name(cell: str, seed: int) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in cell.lower())
    return "-".join(filter(None, slug.split("-"))) + f"-seed{seed}"


def command(run_dir: Path, settings: dict, threads: int) -> list[str]:
    line = [sys.executable, "-m", "experiments", "lm-train", "--threads", str(threads), "--quiet",
            "--out", str(run_dir)]
    line += [arg for text in override_texts(settings) for arg in ("--set", text)]
    return line + (["--resume"] if (run_dir / "checkpoint.pt").exists() else [])


def instability(summary: dict, losses: list[float]) -> str | None:
    """Why a run is unstable (see the module's docstring), or None."""
    if summary["diverged_at"] is not None:
        return "diverged"
    if not summary["final_val_loss"] < summary["unigram_val_loss"]:
        return "not below unigram"
    lowest = math.inf
    for end in range(SPIKE_WINDOW, len(losses) + 1):
        mean = statistics.fmean(losses[end - SPIKE_WINDOW:end])
        if mean > lowest + SPIKE_NATS:
            return "loss spike"
        lowest = min(lowest, mean)
    return None


def run_record(run_dir: Path) -> dict | None:
    """A finished run's summary, verdict and validation curve; None while it is not finished."""
    if not (run_dir / "summary.json").exists():
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validation = [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()]
    per_tensor = [r["v_zeros"]["per_tensor"] for r in validation if r["v_zeros"]]
    return {**summary, "unstable": instability(summary, losses),
            "curve": [[r["step"], r["val_loss"]] for r in validation],
            "v_zero_fraction_max_per_tensor": {name: max(p[name] for p in per_tensor) for name in per_tensor[0]}
            if per_tensor else None}


def cell_rows(study: Study, runs: list[dict]) -> list[dict]:
    """Per cell: runs, % unstable (and why), median final validation loss and perplexity of the stable runs
    with their spread (max - min), the zero-v statistic, the untrained and unigram baselines."""
    rows = []
    for cell in study.cells:
        members = [r for r in runs if r["cell"] == cell]
        if not members:
            continue
        stable = [r["final_val_loss"] for r in members if r["unstable"] is None]
        reasons = [r["unstable"] for r in members if r["unstable"]]
        zeros = [r["v_zero_fraction_max"] for r in members if r["v_zero_fraction_max"] is not None]
        rows.append({
            "cell": cell, "runs": len(members), "unstable_percent": 100 * len(reasons) / len(members),
            "unstable_why": ", ".join(f"{reasons.count(why)} {why}" for why in sorted(set(reasons))),
            "val_loss": statistics.median(stable) if stable else None,
            "val_loss_spread": max(stable) - min(stable) if stable else None,
            "perplexity": math.exp(statistics.median(stable)) if stable else None,
            "v_zero_percent": 100 * statistics.median(zeros) if zeros else None,
            "untrained_val_loss": statistics.median(r["untrained_val_loss"] for r in members),
            "unigram_val_loss": members[0]["unigram_val_loss"],
            "optimizer_state_bytes": members[0]["optimizer_state_bytes"],
            "optimizer_ms_per_step": statistics.median(r["optimizer_ms_per_step"] or 0 for r in members),
        })
    return rows


def markdown(record: dict) -> str:
    """The study's table with its baselines and how a run was judged."""
    rows = record["rows"]
    if not rows:
        return "(no finished runs yet)\n"
    table = markdown_table(rows, ["cell", "runs", "unstable_percent", "unstable_why", "val_loss", "val_loss_spread",
                                  "perplexity", "v_zero_percent", "optimizer_state_bytes", "optimizer_ms_per_step"],
                           headers={"unstable_percent": "unstable %", "unstable_why": "why",
                                    "val_loss": "val loss (stable runs)", "val_loss_spread": "spread",
                                    "v_zero_percent": "v stored as 0, %", "optimizer_state_bytes": "state KiB",
                                    "optimizer_ms_per_step": "optimizer ms/step"},
                           formats={"unstable_percent": ".0f", "val_loss": ".3f", "val_loss_spread": ".3f",
                                    "perplexity": ".2f", "v_zero_percent": ".3f", "optimizer_ms_per_step": ".1f",
                                    "optimizer_state_bytes": lambda b: f"{b / 2**10:.0f}"})
    baselines = (f"Baselines on the same validation windows: unigram (byte frequencies of train) "
                 f"{rows[0]['unigram_val_loss']:.3f} nats, perplexity {math.exp(rows[0]['unigram_val_loss']):.2f}; "
                 f"the untrained model {statistics.median(r['untrained_val_loss'] for r in rows):.3f} nats.")
    return (f"{record['what']}\n\n{table}\n\n{baselines} Validation loss in nats a byte: the median over the stable "
            f"runs, spread = max - min. Unstable: a non-finite loss or gradient, a final validation loss not below "
            f"the unigram baseline, or a {SPIKE_NATS}-nat spike of the {SPIKE_WINDOW}-step mean training loss. "
            f"\"v stored as 0\": the largest, over a run's evaluations, fraction of elements with a non-zero "
            f"gradient whose quantized second moment is 0 (median over runs).\n{zero_v_markdown(record)}\n"
            f"{recorded_with(record.get('environment'))}Reproduce: `{record['command']}`\n")


# the model's tensors with 8-bit states, by role (models/gpt.py's parameter names)
LAYER_ROLES = {"token_embedding.weight": "token embedding", "position_embedding": "position embedding",
               "qkv.weight": "attention qkv", "proj.weight": "attention out",
               "mlp.0.weight": "MLP in", "mlp.2.weight": "MLP out", "head.weight": "head"}


def layer_role(name: str) -> str | None:
    return next((role for suffix, role in LAYER_ROLES.items() if name.endswith(suffix)), None)


def zero_v_rows(record: dict) -> list[dict]:
    """Per cell with a quantized second moment: the median over runs of each layer role's largest
    fraction of v stored as 0 (in %), and the median over a cell's unstable and its stable runs."""
    rows = []
    for cell in record["cells"]:
        members = [r for r in record["runs"] if r["cell"] == cell and r["v_zero_fraction_max_per_tensor"]]
        if not members:
            continue
        row = {"cell": cell}
        for role in dict.fromkeys(LAYER_ROLES.values()):
            values = [max((f for name, f in r["v_zero_fraction_max_per_tensor"].items() if layer_role(name) == role),
                          default=None) for r in members]
            values = [v for v in values if v is not None]
            row[role] = 100 * statistics.median(values) if values else None
        for label, chosen in (("unstable runs", [r for r in members if r["unstable"]]),
                              ("stable runs", [r for r in members if not r["unstable"]])):
            row[label] = 100 * statistics.median(r["v_zero_fraction_max"] for r in chosen) if chosen else None
        rows.append(row)
    return rows


def zero_v_markdown(record: dict) -> str:
    rows = zero_v_rows(record)
    if not rows:
        return ""
    columns = ["cell", *dict.fromkeys(LAYER_ROLES.values()), "unstable runs", "stable runs"]
    table = markdown_table(rows, columns, formats=dict.fromkeys(columns[1:], ".3g"))
    return ("\nThe second moment stored as 0 where the gradient is not (%, the largest over a run's evaluations, "
            "median over runs), by layer, and over the whole model for the cell's unstable and stable runs (a "
            "tensor under min_8bit_size, or with a 32-bit state such as StableEmbedding's, has none):\n\n"
            f"{table}\n")


def recorded_with(environment: dict | None) -> str:
    if not environment:
        return ""
    keys = ("cpu", "cpu_count", "torch_threads", "python", "torch", "numba", "bitsandbytes", "quantlab", "git_commit",
            "git_dirty")
    return "Recorded with " + ", ".join(f"{k} {environment[k]}" for k in keys if k in environment) + ".\n\n"


def plot_curves(record: dict, path: Path) -> Path:
    """Validation loss against step, one panel a cell, one line a seed, the unigram baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [row["cell"] for row in record["rows"]]
    columns = min(5, len(cells))
    rows = -(-len(cells) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), sharex=True, sharey=True,
                             squeeze=False)
    for ax, cell in zip(axes.flat, cells):
        for run in (r for r in record["runs"] if r["cell"] == cell):
            steps, losses = zip(*run["curve"])
            ax.plot(steps, losses, color="tab:red" if run["unstable"] else "tab:blue", alpha=0.6, linewidth=1)
        ax.axhline(record["rows"][0]["unigram_val_loss"], color="gray", linestyle="--", linewidth=1)
        ax.set_title(cell.replace(" / ", "\n"), fontsize=8)
        ax.set_ylim(1, 6)  # the untrained model starts at log 256 = 5.55
    for ax in axes.flat[len(cells):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("validation loss (nats)")
    fig.suptitle(f"{record['study']}: validation loss per seed (red: unstable; dashed: unigram)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Software": None})  # no version stamp: same data, same bytes
    plt.close(fig)
    return path


def plot_state_bits(record: dict, path: Path) -> Path:
    """The state-bits study: final validation loss (median of the stable runs, bars from min to max)
    against state bits, one line a code; a code's unstable runs as crosses at the top; 32-bit Adam, the
    unigram and the untrained baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {row["cell"]: row for row in record["rows"]}
    ceiling = max(row["untrained_val_loss"] for row in rows.values())
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k, family in enumerate(STATE_BIT_CODES):
        bits, medians, low, high, failed = [], [], [], [], []
        for b in STATE_BITS:
            runs = [r for r in record["runs"] if r["cell"] == f"{b}-bit, {family}"]
            stable = [r["final_val_loss"] for r in runs if r["unstable"] is None]
            if stable:
                bits.append(b + 0.06 * (k - 1.5))
                medians.append(statistics.median(stable))
                low.append(medians[-1] - min(stable))
                high.append(max(stable) - medians[-1])
            failed += [b + 0.06 * (k - 1.5)] * (len(runs) - len(stable))
        line = ax.errorbar(bits, medians, yerr=[low, high], marker="o", capsize=2, label=family)
        ax.plot(failed, [ceiling] * len(failed), "x", color=line[0].get_color(), markersize=8)
    baselines = (("32-bit Adam", rows.get("32-bit Adam", {}).get("val_loss"), "black", "-"),
                 ("unigram", record["rows"][0]["unigram_val_loss"], "gray", "--"),
                 ("untrained", ceiling, "gray", ":"))
    for label, value, color, style in baselines:
        if value is not None:
            ax.axhline(value, color=color, linestyle=style, linewidth=1, label=label)
    ax.set_xlabel("bits a state (crosses at the top: unstable runs)")
    ax.set_ylabel("final validation loss (nats a byte)")
    ax.set_xticks(STATE_BITS)
    ax.set_title(f"{record['study']}: Adam with 2- to 8-bit states (median of the stable runs, min-max bars)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path


def write_record(study: Study, out: Path, command_line: str) -> dict:
    runs = []
    for cell, seed in study.plan():
        result = run_record(out / "runs" / run_name(cell, seed))
        if result is not None:
            runs.append({"cell": cell, "seed": seed, **result})
    environment = None
    if runs:  # what made the first run (runs of one study share a machine and versions)
        cell, seed = runs[0]["cell"], runs[0]["seed"]
        environment = json.loads((out / "runs" / run_name(cell, seed) / "versions.json").read_text())
    record = {"study": study.name, "what": study.what, "command": command_line, "settings": study.settings,
              "cells": study.cells, "seeds": list(study.seeds), "environment": environment, "runs": runs,
              "rows": cell_rows(study, runs)}
    (out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "table.md").write_text(markdown(record))
    if runs:
        plot_curves(record, out / "curves.png")
        if study.name == "state-bits":
            plot_state_bits(record, out / "state_bits.png")
    return record


def run(study: Study, out: Path, workers: int, table_only: bool = False, command_line: str = "") -> dict:
    """Runs what is not finished of the study on `workers` processes, then writes and returns its record."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    threads = max(1, (os.cpu_count() or 1) // workers)
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    if not table_only:
        todo = [r for r in study.plan() if not (out / "runs" / run_name(*r) / "summary.json").exists()]
        print(f"{len(study.plan()) - len(todo)} of {len(study.plan())} runs finished; {len(todo)} to go on "
              f"{workers} workers x {threads} threads", flush=True)
        jobs = {run_name(cell, seed): (out / "runs" / run_name(cell, seed),
                                       [command(out / "runs" / run_name(cell, seed), study.run_settings(cell, seed),
                                                threads)]) for cell, seed in todo}
        failures = execute_all(jobs, workers, threads)
    record = write_record(study, out, command_line)
    print(markdown(record))
    print(f"saved {out}/record.json, table.md and curves.png")
    if failures:
        sys.exit(f"{len(failures)} runs failed: {', '.join(failures)}")
    return record


DEMO_CELLS = {"AdamW 32-bit (torch)": {"library": "torch"}, "AdamW 8-bit dynamic": {},
              "AdamW 8-bit linear, one block a tensor": {"code": "linear", "block_size": 0}}
QUICK = {"corpus": "shakespeare-slice", "width": 32, "depth": 1, "steps": 20, "warmup_steps": 2, "eval_every": 10,
         "eval_tokens": 2048, "checkpoint_every": 0}


def demo(out_dir="results/lm-demo", quick: bool = False) -> dict:
    """nanoGPT's CPU recipe with 32-bit AdamW, 8-bit dynamic and 8-bit linear (one block a tensor) states,
    seed 0, two runs at a time: a few minutes on 2 cores (quick: seconds)."""
    started = time.perf_counter()
    study = Study("lm-demo", "A byte-level GPT on Shakespeare (nanoGPT's CPU recipe), seed 0, AdamW with 32-bit "
                  "and 8-bit states.", DEMO_CELLS, (0,), dict(QUICK if quick else RECIPE))
    record = run(study, Path(out_dir), workers=min(2, os.cpu_count() or 1),
                 command_line="python -m experiments lm-demo" + (" --quick" if quick else ""))
    print(f"lm-demo took {time.perf_counter() - started:.0f} s")
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=list(STUDIES))
    parser.add_argument("--out", type=Path, required=True, help="the study goes to OUT/STUDY")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="default: 2 for lr-sweep and state-bits, 10 for stability, 5 at the moderate lr, "
                             "3 for table1 and four-bit")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--print-commands", action="store_true", help="print each run's command line and exit")
    parser.add_argument("--table-only", action="store_true", help="build the record from finished runs")
    args = parser.parse_args(argv)
    study = STUDIES[args.study](*([tuple(args.seeds)] if args.seeds else []))
    out = args.out / study.name
    line = shlex.join(["python", "-m", "experiments.studies.language", args.study, "--out", str(args.out),
                       *(["--seeds", *map(str, args.seeds)] if args.seeds else [])])
    if args.print_commands:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        for cell, seed in study.plan():
            print(shlex.join(command(out / "runs" / run_name(cell, seed), study.run_settings(cell, seed), threads)))
        return None
    try:
        return run(study, out, args.workers, args.table_only, line)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
