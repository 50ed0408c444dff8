"""The shape checks every evaluation runs on its features and labels before fitting anything."""
from __future__ import annotations

import torch


def check_features(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels) or len(features) == 0:
        raise ValueError(f"{name}: expected non-empty features [N, D] and labels [N], "
                         f"got {tuple(features.shape)} and {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.min() < 0:
        raise ValueError(f"{name}: labels must be non-negative integers")


def check_train_test(train_features, train_labels, test_features, test_labels) -> None:
    check_features(train_features, train_labels, "train")
    check_features(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train and test feature sizes differ: {train_features.shape[1]} vs {test_features.shape[1]}")


def check_multilabel(images_or_features: torch.Tensor, targets: torch.Tensor, name: str) -> None:
    if targets.ndim != 2 or len(targets) != len(images_or_features) or len(targets) == 0:
        raise ValueError(f"{name}: expected non-empty targets [N, C] for {len(images_or_features)} items, "
                         f"got {tuple(targets.shape)}")
    if not bool(((targets == 0) | (targets == 1)).all()):
        raise ValueError(f"{name}: targets must be multi-hot (0 or 1)")
