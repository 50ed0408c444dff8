"""Scores of predictions: accuracy for single-label tasks, ROC AUC per label for multi-label ones."""
from __future__ import annotations

import math
import warnings

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels.to(predictions.device)).float().mean().item()


def roc_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative, ties
    counting one half. By the Mann-Whitney identity it is (sum of the positives' ranks - P(P+1)/2) / (P N),
    with tied scores sharing their mean rank."""
    if scores.ndim != 1 or scores.shape != targets.shape:
        raise ValueError(f"expected scores [N] and targets [N], got {tuple(scores.shape)} and {tuple(targets.shape)}")
    scores, targets = scores.detach().double().cpu(), targets.detach().double().cpu()
    if not bool(scores.isfinite().all()):
        raise ValueError("scores must be finite")
    if not bool(((targets == 0) | (targets == 1)).all()):
        raise ValueError("targets must be 0 or 1")
    positives = targets.sum().item()
    negatives = len(targets) - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"AUC needs both classes, got {positives:.0f} positives and {negatives:.0f} negatives")
    sorted_scores, order = scores.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()  # 1-based rank of each tie group's last member
    mean_rank = (last_rank - (counts - 1) / 2)[inverse]
    positive_rank_sum = (mean_rank * targets[order]).sum().item()
    return (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def mean_auc(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, list[float]]:
    """(mean AUC over labels, AUC of each label) for scores and 0/1 targets [N, C]. A label whose column has
    only positives or only negatives has no AUC: it is NaN in the list, left out of the mean, and named in a
    warning; with no usable label at all this is a ValueError."""
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"expected scores and targets [N, C], got {tuple(scores.shape)} and {tuple(targets.shape)}")
    both_classes = (targets.amax(dim=0) != targets.amin(dim=0)).tolist()
    per_label = [roc_auc(scores[:, c], targets[:, c]) if usable else math.nan for c, usable in enumerate(both_classes)]
    usable = [auc for auc in per_label if not math.isnan(auc)]
    if not usable:
        raise ValueError("no label has both positives and negatives: the mean AUC is undefined")
    if len(usable) < len(per_label):
        skipped = [c for c, ok in enumerate(both_classes) if not ok]
        warnings.warn(f"labels {skipped} have a single class in the targets: left out of the mean AUC", stacklevel=2)
    return sum(usable) / len(usable), per_label
