"""Linear probes: logistic regression on frozen, standardised features, multinomial for single-label
tasks and one-vs-rest for multi-label ones, fitted full-batch by L-BFGS (a convex problem: no
learning-rate schedule to tune, no mini-batch noise)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from experiments.eval.checks import check_multilabel, check_train_test
from experiments.eval.metrics import accuracy, mean_auc


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean, unit variance per feature, with the training set's statistics for both."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)  # constant features: no division by 0
    return (train - mean) / std, (test - mean) / std


def fit_linear(x_train: torch.Tensor, targets: torch.Tensor, outputs: int, data_loss, epochs: int, lr: float,
               weight_decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [D, outputs], bias [outputs]) minimising data_loss(x @ weight + bias, targets) + weight_decay / 2
    * ||weight||^2 full-batch by L-BFGS with a strong-Wolfe line search (`epochs` iterations); `seed`
    draws the initial weights. Returned detached."""
    device = x_train.device
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(x_train.shape[1], outputs, generator=generator)).to(device).requires_grad_()
    bias = torch.zeros(outputs, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=lr, max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = data_loss(x_train @ weight + bias, targets) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 100, lr: float = 1.0, weight_decay: float = 1e-4,
                 seed: int = 0) -> float:
    """Test accuracy of multinomial logistic regression on frozen, standardised features.

    Minimises mean cross-entropy + weight_decay / 2 * ||W||^2 (bias not decayed) full-batch with
    L-BFGS and a strong-Wolfe line search; `epochs` is the number of L-BFGS iterations, each a pass
    over all training features. The problem is convex, so this reaches the optimum in seconds with
    no learning-rate schedule to tune and no mini-batch noise; `seed` only draws the initial weights.
    """
    check_train_test(train_features, train_labels, test_features, test_labels)
    if epochs < 1 or lr <= 0 or weight_decay < 0:
        raise ValueError(f"need epochs >= 1, lr > 0, weight_decay >= 0; got {epochs}, {lr}, {weight_decay}")
    device = train_features.device
    x_train, x_test = standardise(train_features.float(), test_features.float().to(device))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight, bias = fit_linear(x_train, train_labels.to(device).long(), num_classes, F.cross_entropy, epochs, lr,
                              weight_decay, seed)
    return accuracy((x_test @ weight + bias).argmax(dim=1), test_labels)


def linear_probe_multilabel(train_features: torch.Tensor, train_targets: torch.Tensor, test_features: torch.Tensor,
                            test_targets: torch.Tensor, epochs: int = 100, weight_decay: float = 1e-4,
                            seed: int = 0) -> dict:
    """{"mean_auc", "per_label_auc"} of one-vs-rest logistic regression on frozen, standardised features.

    Minimises, summed over labels, mean binary cross-entropy + weight_decay / 2 * ||w_label||^2 (biases not
    decayed): one independent convex problem a label, each the objective of evaluate.linear_probe, solved
    together full-batch by L-BFGS (`epochs` iterations, strong-Wolfe line search); `seed` only draws the
    initial weights."""
    check_multilabel(train_features, train_targets, "train")
    check_multilabel(test_features, test_targets, "test")
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"expected features [N, D] of one size D, got {tuple(train_features.shape)} and "
                         f"{tuple(test_features.shape)}")
    if train_targets.shape[1] != test_targets.shape[1]:
        raise ValueError(f"train and test have {train_targets.shape[1]} and {test_targets.shape[1]} labels")
    if epochs < 1 or weight_decay < 0:
        raise ValueError(f"need epochs >= 1 and weight_decay >= 0, got {epochs} and {weight_decay}")
    device = train_features.device
    x_train, x_test = standardise(train_features.float(), test_features.float().to(device))
    y_train = train_targets.to(device, torch.float32)

    def mean_binary_cross_entropy(logits, targets):  # summed over labels: one independent problem a label
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(targets)

    weight, bias = fit_linear(x_train, y_train, y_train.shape[1], mean_binary_cross_entropy, epochs, 1.0,
                              weight_decay, seed)
    mean, per_label = mean_auc((x_test @ weight + bias).cpu(), test_targets)
    return {"mean_auc": mean, "per_label_auc": per_label}
