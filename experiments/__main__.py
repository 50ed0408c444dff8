"""Self-supervised pretraining runs: train, evaluate, compare, and the demo.

    python -m experiments pretrain --config moco.toml --optimizer quantlab-adamw --out runs/moco-q8
    python -m experiments pretrain --out runs/moco-q8 --resume --epochs 20   # continue, or extend
    python -m experiments evaluate runs/moco-q8 [--finetune] [--dataset mnist]
    python -m experiments compare runs/moco-fp32 runs/moco-q8 --out runs/compare
    python -m experiments demo [--out results/demo] [--quick]

A run's config resolves as: defaults < the resumed run's config.json < --config FILE (TOML or JSON)
< pretrain's flags (--method, --optimizer, ...) < --set key=value (repeatable; nested keys with a dot;
values read as JSON where they parse: --set augment.blur_p=0 --set betas=[0.9,0.95]).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# flag -> (config key, type)
CONFIG_FLAGS = {"--method": ("method", str), "--backbone": ("backbone", str), "--optimizer": ("optimizer", str),
                "--state-bits": ("state_bits", int), "--epochs": ("epochs", int), "--batch-size": ("batch_size", int),
                "--lr": ("lr", float), "--seed": ("seed", int), "--dataset": ("dataset", str),
                "--train-subset": ("train_subset", int), "--device": ("device", str), "--threads": ("threads", int)}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="train an SSL method into a run directory")
    pretrain.add_argument("--config", type=Path, help="TOML or JSON file of RunConfig keys")
    for flag, (key, kind) in CONFIG_FLAGS.items():
        pretrain.add_argument(flag, dest=key, type=kind, help=f"config key {key}")
    pretrain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pretrain.add_argument("--out", type=Path, required=True, help="the run directory")
    pretrain.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    pretrain.add_argument("--overwrite", action="store_true", help="start afresh over an existing run")
    pretrain.add_argument("--quiet", action="store_true", help="no progress lines")

    evaluate = commands.add_parser("evaluate", help="k-NN and linear probe of a run's backbone -> eval.json")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--finetune", action="store_true", help="also fine-tune at config.finetune_fractions")
    evaluate.add_argument("--dataset", help="evaluate on this dataset instead of the run's own (-> eval-DATASET.json)")

    compare = commands.add_parser("compare", help="table and loss curves of several runs")
    compare.add_argument("run_dirs", type=Path, nargs="+")
    compare.add_argument("--out", type=Path, required=True)

    demo = commands.add_parser("demo", help="MoCo v2 with fp32 vs 8-bit AdamW on the embedded Fashion-MNIST subset")
    demo.add_argument("--out", type=Path, default=Path("results/demo"))
    demo.add_argument("--quick", action="store_true", help="a tiny version, seconds long")
    return root


def pretrain_config(args):
    from experiments.engine.config import load_config, parse_override, read_config_file

    layers = []
    if args.resume and (args.out / "config.json").exists():
        layers.append(json.loads((args.out / "config.json").read_text()))
    if args.config is not None:
        layers.append(read_config_file(args.config))
    layers.append({key: getattr(args, key) for key, _ in CONFIG_FLAGS.values() if getattr(args, key) is not None})
    layers += [parse_override(text) for text in args.overrides]
    return load_config(*layers)


def main(argv=None):
    args = parser().parse_args(argv)
    if args.command == "pretrain":
        from experiments.engine.run import pretrain

        summary = pretrain(pretrain_config(args), args.out, resume=args.resume, progress=not args.quiet,
                           overwrite=args.overwrite)
        print(json.dumps(summary, indent=2))
        return summary
    if args.command == "evaluate":
        from experiments.engine.evaluate import evaluate_run

        result = evaluate_run(args.run_dir, finetune=args.finetune, dataset=args.dataset)
        print(json.dumps(result, indent=2))
        return result
    if args.command == "compare":
        from experiments.studies.compare import compare_runs, markdown_table

        rows = compare_runs(args.run_dirs, args.out)
        print(markdown_table(rows))
        return rows
    from experiments.studies.demo import demo

    return demo(args.out, quick=args.quick)


if __name__ == "__main__":
    main()
