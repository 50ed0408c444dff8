"""Self-supervised pretraining runs: train, evaluate, compare, and the demo.

    python -m experiments pretrain --config moco.toml --optimizer quantlab-adamw --out runs/moco-q8
    python -m experiments pretrain --out runs/moco-q8 --resume --epochs 20   # continue, or extend
    python -m experiments evaluate runs/moco-q8 [--finetune] [--dataset mnist]
    python -m experiments compare runs/moco-fp32 runs/moco-q8 --out runs/compare
    python -m experiments demo [--out results/demo] [--quick]
    python -m experiments lm-train --out runs/lm-q8 --set code=linear --set embedding=stable
    python -m experiments lm-demo [--out results/lm-demo] [--quick]

A run's config resolves as: defaults < the resumed run's config.json < --config FILE (TOML or JSON)
< pretrain's flags (--method, --optimizer, ...) < --set key=value (repeatable; nested keys with a dot;
values read as JSON where they parse: --set augment.blur_p=0 --set betas=[0.9,0.95]). lm-train's config
(engine/language_model.py's LMConfig) resolves the same way.
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
LM_FLAGS = {"--steps": ("steps", int), "--lr": ("lr", float), "--seed": ("seed", int), "--threads": ("threads", int)}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True)

    for name, flags, what in (("pretrain", CONFIG_FLAGS, "train an SSL method into a run directory"),
                              ("lm-train", LM_FLAGS, "train a small GPT on byte-level text into a run directory")):
        train = commands.add_parser(name, help=what)
        train.add_argument("--config", type=Path, help="TOML or JSON file of config keys")
        for flag, (key, kind) in flags.items():
            train.add_argument(flag, dest=key, type=kind, help=f"config key {key}")
        train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        train.add_argument("--out", type=Path, required=True, help="the run directory")
        train.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
        train.add_argument("--overwrite", action="store_true", help="start afresh over an existing run")
        train.add_argument("--quiet", action="store_true", help="no progress lines")

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

    lm_demo = commands.add_parser("lm-demo", help="a GPT on Shakespeare with 32-bit vs 8-bit AdamW states")
    lm_demo.add_argument("--out", type=Path, default=Path("results/lm-demo"))
    lm_demo.add_argument("--quick", action="store_true", help="a tiny version, seconds long")
    return root


def train_config(args, flags=CONFIG_FLAGS, kind=None):
    """The config of a pretrain (or, with LM_FLAGS and LMConfig, an lm-train) command."""
    from experiments.engine.config import RunConfig, load_config, parse_override, read_config_file

    layers = []
    if args.resume and (args.out / "config.json").exists():
        layers.append(json.loads((args.out / "config.json").read_text()))
    if args.config is not None:
        layers.append(read_config_file(args.config))
    layers.append({key: getattr(args, key) for key, _ in flags.values() if getattr(args, key) is not None})
    layers += [parse_override(text) for text in args.overrides]
    return load_config(*layers, kind=kind or RunConfig)


def main(argv=None):
    args = parser().parse_args(argv)
    if args.command == "pretrain":
        from experiments.engine.run import pretrain

        summary = pretrain(train_config(args), args.out, resume=args.resume, progress=not args.quiet,
                           overwrite=args.overwrite)
        print(json.dumps(summary, indent=2))
        return summary
    if args.command == "lm-train":
        from experiments.engine.language_model import LMConfig, train_language_model

        summary = train_language_model(train_config(args, LM_FLAGS, LMConfig), args.out, resume=args.resume,
                                       progress=not args.quiet, overwrite=args.overwrite)
        print(json.dumps(summary, indent=2))
        return summary
    if args.command == "lm-demo":
        from experiments.studies.language import demo as lm_demo

        return lm_demo(args.out, quick=args.quick)
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
