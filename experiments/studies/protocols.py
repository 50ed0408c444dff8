"""The recorded SSL experiments, each a set of sweeps (sweep.py) with fixed settings.

    python -m experiments.studies.protocols five-methods --out results/ssl     # five methods x state formats
    python -m experiments.studies.protocols medical-mae --out results/ssl      # mask ratio x crop scale, mean AUC
    python -m experiments.studies.protocols pass --out results/ssl             # pretrain on generated images or not
    python -m experiments.studies.protocols four-bit --out results/ssl         # 4-bit vs 8- and 32-bit states
    python -m experiments.studies.protocols pass --out results/ssl --print-commands   # for a cluster launcher

Each variant is a sweep in OUT/PROTOCOL/VARIANT (resumable: run the command again to finish it). Then
each backbone is evaluated as its runs initialise it (OUT/PROTOCOL/untrained.json: what pretraining
has to beat), and OUT/PROTOCOL/record.json holds every variant's table and command and those
baselines, which `python -m paper_figs.record_ssl OUT/PROTOCOL/record.json` files under
paper_figs/results/.

All share one small training recipe, sized for a 2-core machine: the embedded 5000-image
Fashion-MNIST subset (or a stand-in of the same size), 3 epochs of 128-image batches (117 steps),
AdamW lr 2e-3 with half an epoch of warm-up then cosine, weight decay 1e-4; resnet-tiny, MAE on vit-tiny.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from experiments.engine.config import merge
from experiments.studies import sweep
from experiments.studies.sweep import Sweep

RECIPE = {"dataset": "fashion-mnist-subset", "epochs": 3, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4,
          "warmup_epochs": 0.5, "checkpoint_every": 50}


@dataclass(frozen=True)
class Protocol:
    what: str  # one paragraph: the question and the setup, printed with the tables
    variants: dict[str, Sweep]  # label -> its sweep


def variants_of(base: Sweep, settings: dict[str, dict]) -> dict[str, Sweep]:
    """label -> the base sweep with those settings merged over its own."""
    return {label: replace(base, settings=merge(base.settings, extra)) for label, extra in settings.items()}


PROTOCOLS = {
    "five-methods": Protocol(
        what="Five SSL methods x optimizer state: torch fp32 AdamW vs quantlab 8-bit AdamW (dynamic code, blocks "
             "of 256), with 2048-element blocks and a linear code as ablations; k-NN and linear probe on the "
             "Fashion-MNIST subset's test split; medians over 3 seeds.",
        variants={"all": Sweep(methods=("moco", "simclr", "dino", "swav", "mae"),
                               optimizers=("fp32", "8bit", "8bit-block2048", "8bit-linear"), seeds=(0, 1, 2),
                               settings=RECIPE, method_settings={"mae": {"backbone": "vit-tiny"}})}),
    "medical-mae": Protocol(
        what="The medical-MAE protocol on 2x2 mosaics of the Fashion-MNIST subset (multi-label, 1-4 classes an "
             "image): MAE on vit-tiny, mask ratio 0.75 vs 0.90 x crop scale (0.2, 1) vs (0.5, 1), fp32 vs 8-bit "
             "state; mean AUC over the 10 labels of a linear probe and of fine-tuning (layer-wise LR decay 0.55, "
             "DropPath 0.2, RandAugment 2 ops at magnitude 6, 5 epochs on 1000 labelled mosaics, AUC on 1000 "
             "test mosaics); one seed.",
        variants=variants_of(
            Sweep(methods=("mae",), optimizers=("fp32", "8bit"), seeds=(0,), finetune=True,
                  settings={**RECIPE, "dataset": "fashion-mnist-mosaic", "backbone": "vit-tiny", "eval_subset": 1000,
                            "finetune_epochs": 5}),
            {f"mask{mask}-crop{low}": {"method_options": {"mask_ratio": mask}, "augment": {"crop_scale": [low, 1.0]}}
             for mask in (0.75, 0.9) for low in (0.2, 0.5)})),
    "pass": Protocol(
        what="The PASS protocol: MoCo v2 pretrained on 5000 procedurally generated images (no humans, "
             "experiments/data/procedural.py) vs on the 5000-image Fashion-MNIST subset, fp32 vs 8-bit state; "
             "k-NN and linear probe on Fashion-MNIST (subset), MNIST and animal-mnist (at most 10000 train "
             "and test images each); medians over 3 seeds.",
        variants=variants_of(
            Sweep(methods=("moco",), optimizers=("fp32", "8bit"), seeds=(0, 1, 2),
                  settings={**RECIPE, "eval_subset": 10000},
                  eval_datasets=("fashion-mnist-subset", "mnist", "animal-mnist")),
            {"pretrain-procedural": {"dataset": "procedural"}, "pretrain-fashion-mnist": {}})),
    "four-bit": Protocol(
        what="MoCo v2 with 4-bit AdamW states (Li et al. 2023: quantlab.optim.FOUR_BIT, m in blocks of 128, v under "
             "rank-1 normalisation in the zero-free linear code) against torch fp32 and quantlab 8-bit; k-NN and "
             "linear probe on the Fashion-MNIST subset's test split; medians over 3 seeds. (torchao's AdamW4bit is "
             "left out: its states do not load with torch.load(weights_only=True), which evaluation uses.)",
        variants={"moco": Sweep(methods=("moco",), optimizers=("fp32", "8bit", "4bit"),
                                seeds=(0, 1, 2), settings=RECIPE)}),
}


def evaluation_options(protocol: str) -> tuple[list, bool]:
    """The datasets a protocol evaluates on (None: the pretraining one) and whether it fine-tunes."""
    first = next(iter(PROTOCOLS[protocol].variants.values()))
    return list(first.eval_datasets) or [None], first.finetune


def untrained_baselines(protocol: str, out: Path) -> list[dict]:
    """What pretraining has to beat: each backbone as its runs initialise it (per seed), evaluated as
    they are; medians and spreads over seeds, per backbone. Saved as OUT/PROTOCOL/untrained.json."""
    from experiments.engine.evaluate import evaluate_backbone, load_run_config
    from experiments.engine.run import build_method

    datasets, finetune = evaluation_options(protocol)
    configs = {}
    for run_dir in sorted((out / protocol).glob("*/runs/*")):
        if (run_dir / "eval.json").exists() or list(run_dir.glob("eval-*.json")):
            config = load_run_config(run_dir)
            configs.setdefault((config.backbone, config.seed), config)
    by_backbone = {}
    for (backbone, seed), config in sorted(configs.items()):
        print(f"untrained {backbone}, seed {seed}", flush=True)
        values = {}
        for dataset in datasets:
            result = evaluate_backbone(build_method(config).backbone, config, finetune, dataset)
            suffix = "" if dataset is None else f"@{dataset}"
            values.update({key + suffix: result[key] for key in sweep.METRICS if key in result})
        by_backbone.setdefault(backbone, []).append(values)
    rows = []
    for backbone, seeds in by_backbone.items():
        row = {"backbone": backbone, "seeds": len(seeds)}
        for key in seeds[0]:
            row[key] = statistics.median(v[key] for v in seeds)
            row[f"{key}_spread"] = max(v[key] for v in seeds) - min(v[key] for v in seeds)
        rows.append(row)
    (out / protocol / "untrained.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def record(protocol: str, out: Path) -> dict:
    """Every variant's sweep table (rows, runs, command) and the untrained baselines (when computed) in
    one record, saved as OUT/PROTOCOL/record.json."""
    variants = []
    for variant in PROTOCOLS[protocol].variants:
        table = json.loads((out / protocol / variant / "table.json").read_text())
        variants.append({"label": variant, "command": table["command"], "rows": table["summary"],
                         "runs": table["runs"]})
    untrained = out / protocol / "untrained.json"
    result = {"what": PROTOCOLS[protocol].what, "protocol": protocol,
              "command": f"python -m experiments.studies.protocols {protocol} --out {out}", "variants": variants,
              "untrained": json.loads(untrained.read_text()) if untrained.exists() else []}
    (out / protocol / "record.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", choices=list(PROTOCOLS))
    parser.add_argument("--out", type=Path, default=Path("results/ssl"))
    parser.add_argument("--workers", type=int, default=None, help="passed to each sweep (default: its own)")
    parser.add_argument("--print-commands", action="store_true", help="every run's command lines, then exit")
    args = parser.parse_args(argv)
    for variant, variant_sweep in PROTOCOLS[args.protocol].variants.items():
        if args.print_commands:
            sweep.print_commands(variant_sweep, args.out / args.protocol / variant, args.workers)
            continue
        print(f"== {args.protocol} / {variant}", flush=True)
        sweep.run(variant_sweep, args.out / args.protocol / variant, args.workers or os.cpu_count() or 1)
    if args.print_commands:
        return None
    if not (args.out / args.protocol / "untrained.json").exists():
        untrained_baselines(args.protocol, args.out)
    result = record(args.protocol, args.out)
    print(f"saved {args.out / args.protocol / 'record.json'}")
    return result


if __name__ == "__main__":
    main()
