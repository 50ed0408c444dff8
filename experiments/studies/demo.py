"""The demo: MoCo v2 pretrained with float32 AdamW and with 8-bit AdamW, same seed and settings, on the
embedded Fashion-MNIST subset (5000 train / 1000 test images), then compared by k-NN and linear-probe
accuracy, optimizer-state bytes and step time.

    python -m experiments demo                 # about 4 minutes on 2 otherwise idle CPU cores
    python -m experiments demo --quick         # seconds: the same pipeline at toy sizes

Writes a run directory per optimizer and compare.md / .csv / .json and loss_curves.png under --out.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from experiments.engine.config import load_config
from experiments.engine.evaluate import evaluate_backbone, evaluate_run
from experiments.engine.run import build_method, pretrain
from experiments.studies.compare import compare_runs, markdown_table, run_row

# MoCo v2 for a short run: a queue of 8 batches and momentum 0.99 (the paper's 65536 and 0.999 suit 200 epochs)
DEMO_SETTINGS = {"method": "moco", "backbone": "resnet-tiny", "dataset": "fashion-mnist-subset", "seed": 0,
                 "epochs": 8, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4, "warmup_epochs": 0.5,
                 "method_options": {"queue_size": 1024, "momentum": 0.99}, "checkpoint_every": 0}
QUICK_SETTINGS = {**DEMO_SETTINGS, "epochs": 1, "train_subset": 32, "batch_size": 16, "threads": 1,
                  "method_options": {"queue_size": 64}, "eval_subset": 100, "knn_k": 5, "probe_epochs": 5}
OPTIMIZER_RUNS = {"torch-adamw-fp32": {"optimizer": "torch-adamw"},
                  "quantlab-adamw-8bit": {"optimizer": "quantlab-adamw", "state_bits": 8},
                  "bnb-adamw8bit": {"optimizer": "bnb-adamw8bit"}}


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
