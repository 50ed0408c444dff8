"""Evaluation of a run's backbone (or any backbone a run's config describes): k-NN and linear probe, and
fine-tuning when asked, on the run's dataset or another; single-label and multi-label datasets alike."""
from __future__ import annotations

import json
import time
from pathlib import Path

from experiments.data import load_dataset
from experiments.engine.checkpoint import load_checkpoint
from experiments.engine.config import RunConfig
from experiments.engine.run import build_method, fixed_subset, use_threads
from experiments.eval import (
    extract_features,
    fine_tune,
    fine_tune_multilabel,
    knn_accuracy,
    linear_probe,
    linear_probe_multilabel,
)
from experiments.models.vit import VisionTransformer


def load_run_config(run_dir) -> RunConfig:
    return RunConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))


def evaluate_backbone(backbone, config: RunConfig, finetune: bool = False, dataset: str | None = None) -> dict:
    """How good the frozen backbone's features are on `dataset` (default: config.dataset, which it was
    trained on). Single-label: k-NN and linear-probe test accuracy, and fine-tuning accuracy at each of
    config.finetune_fractions of the labels when asked. Multi-label (the medical-MAE protocol): mean
    AUC over labels of a linear probe, and of fine-tuning with layer-wise LR decay, DropPath and
    RandAugment when asked."""
    use_threads(config.threads)
    dataset = dataset or config.dataset
    root = config.data_root if dataset == config.dataset else None
    train, test = (load_dataset(dataset, split, root=root) for split in ("train", "test"))
    if config.eval_subset is not None:
        train, test = (fixed_subset(split, min(config.eval_subset, len(split))) for split in (train, test))
    started = time.perf_counter()
    train_features, test_features = extract_features(backbone, train.images), extract_features(backbone, test.images)
    result = {"dataset": dataset, "train_images": len(train), "test_images": len(test)}
    if train.multilabel:
        probe = linear_probe_multilabel(train_features, train.labels, test_features, test.labels,
                                        epochs=config.probe_epochs, seed=config.seed)
        result.update(linear_mean_auc=probe["mean_auc"], linear_per_label_auc=probe["per_label_auc"])
        if finetune:
            # the paper's ViT recipe; a CNN has no layers to decay or blocks to drop
            recipe = {} if isinstance(backbone, VisionTransformer) else {"layer_decay": 1.0, "drop_path": 0.0}
            tuned = fine_tune_multilabel(backbone, train.images, train.labels, test.images, test.labels,
                                         config.finetune_epochs, config.finetune_lr, config.seed,
                                         warmup_epochs=min(1.0, config.finetune_epochs), **recipe)
            result.update(finetune_mean_auc=tuned["mean_auc"], finetune_per_label_auc=tuned["per_label_auc"])
    else:
        result["knn_accuracy"] = knn_accuracy(train_features, train.labels, test_features, test.labels,
                                              k=config.knn_k, temperature=config.knn_temperature)
        result["linear_accuracy"] = linear_probe(train_features, train.labels, test_features, test.labels,
                                                 epochs=config.probe_epochs, seed=config.seed)
        if finetune:
            result["finetune_accuracy"] = {
                str(fraction): fine_tune(backbone, train, test, fraction, config.finetune_epochs, config.finetune_lr,
                                         config.seed) for fraction in config.finetune_fractions}
    result["eval_s"] = time.perf_counter() - started
    return result


def eval_file(run_dir: Path, dataset: str | None = None) -> Path:
    """eval.json for the run's own dataset, eval-DATASET.json for another."""
    own = dataset is None or dataset == load_run_config(run_dir).dataset
    return run_dir / ("eval.json" if own else f"eval-{dataset}.json")


def evaluate_run(run_dir, finetune: bool = False, dataset: str | None = None) -> dict:
    """evaluate_backbone on the run's final checkpoint; saves eval_file(run_dir, dataset)."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    checkpoint = load_checkpoint(run_dir)
    method = build_method(config)
    method.load_state_dict(checkpoint["model"])
    result = {"step": checkpoint["step"], **evaluate_backbone(method.backbone, config, finetune, dataset)}
    eval_file(run_dir, dataset).write_text(json.dumps(result, indent=2) + "\n")
    return result
