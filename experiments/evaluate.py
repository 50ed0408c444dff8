"""How good are a backbone's features? Three standard answers, each returning test accuracy.

- k-NN (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination";
  the protocol DINO's eval_knn follows): the k training features most cosine-similar to a test
  feature vote for their class with weight exp(similarity / T). No training, no hyper-parameters
  to tune beyond k and T.
- Linear probe: multinomial logistic regression on frozen, standardised features.
- Fine-tuning: the whole backbone plus a linear head trained on a class-balanced fraction of the
  labels (the 100% / 25% / 12.5% label-fraction protocol).

Features and predictions stay on the backbone's device, so the same code runs on CPU or GPU.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageDataset, stratified_fraction, to_float


def module_device(module: nn.Module) -> torch.device:
    """Where the module's parameters live (the CPU for a module without any)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels.to(predictions.device)).float().mean().item()


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


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, D] on the backbone's device, computed in eval mode.

    Every submodule's train/eval flag is put back afterwards, so a training loop can call this mid-run.
    """
    if images.ndim != 3 or len(images) == 0:
        raise ValueError(f"images must be a non-empty uint8 [N, H, W] tensor, got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = module_device(backbone)
    modes = [(module, module.training) for module in backbone.modules()]
    backbone.eval()
    try:
        # move uint8 to the device and convert there: a quarter of the float32 transfer
        features = [backbone(to_float(batch.to(device))).float() for batch in images.split(batch_size)]
    finally:
        for module, training in modes:
            module.training = training
    return torch.cat(features)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, chunk_size: int = 256) -> torch.Tensor:
    """Weighted k-NN class predictions, int64 [M], on train_features' device.

    k must lie in 1 .. len(train_features): a larger k is an error rather than silently clamped,
    since it would mean every test point is voted on by the whole training set.
    """
    check_features(train_features, train_labels, "train")
    if test_features.ndim != 2 or test_features.shape[1] != train_features.shape[1] or len(test_features) == 0:
        raise ValueError(f"test features must be non-empty [M, {train_features.shape[1]}], "
                         f"got {tuple(test_features.shape)}")
    if not 1 <= k <= len(train_features):
        raise ValueError(f"k must be in 1..{len(train_features)} (the training set size), got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(device).long()
    num_classes = int(labels.max()) + 1
    predictions = []
    # one [chunk, N_train] similarity block at a time: 10k x 60k at once would be 2.4 GB
    for test in F.normalize(test_features.float().to(device), dim=1).split(chunk_size):
        similarity, neighbours = (test @ train.T).topk(k, dim=1)
        # exp((s - s_max) / T) is exp(s / T) times one factor per row: same argmax, no overflow at small T
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(len(test), num_classes, device=device).scatter_add_(1, labels[neighbours], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, chunk_size: int = 256) -> float:
    """Test accuracy of weighted k-NN classification (cosine similarity, votes exp(sim / T))."""
    check_train_test(train_features, train_labels, test_features, test_labels)
    return accuracy(knn_predict(train_features, train_labels, test_features, k, temperature, chunk_size), test_labels)


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean, unit variance per feature, with the training set's statistics for both."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)  # constant features: no division by 0
    return (train - mean) / std, (test - mean) / std


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


def add_linear_head(backbone: nn.Module, num_classes: int, example: torch.Tensor) -> nn.Sequential:
    """A copy of the backbone followed by a linear classifier sized by a forward pass of `example` images."""
    encoder = copy.deepcopy(backbone)
    feature_dim = extract_features(encoder, example).shape[1]
    return nn.Sequential(encoder, nn.Linear(feature_dim, num_classes, device=module_device(encoder)))


def fine_tune(backbone: nn.Module, train: ImageDataset, test: ImageDataset, label_fraction: float, epochs: int,
              lr: float, seed: int, batch_size: int = 256, weight_decay: float = 0.05) -> float:
    """Test accuracy after training a copy of the backbone plus a linear head on a labelled fraction.

    The labelled examples are stratified_fraction(train.labels, label_fraction, seed). All weights
    are trained with AdamW (weight decay on matrices and kernels only, not on biases or norm
    scales, as in MAE / nanoGPT) and a per-step cosine learning-rate schedule to zero, on plain
    to_float images. `seed` fixes the subset, the head's initialisation, the shuffling and any
    dropout; the caller's random state and backbone are left untouched.
    """
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    if epochs < 1 or lr <= 0 or batch_size < 1 or weight_decay < 0:
        raise ValueError(f"need epochs >= 1, lr > 0, batch_size >= 1, weight_decay >= 0; "
                         f"got {epochs}, {lr}, {batch_size}, {weight_decay}")
    device = module_device(backbone)
    labelled = stratified_fraction(train.labels, label_fraction, seed)
    images, labels = train.images[labelled], train.labels[labelled]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(seed)
        model = add_linear_head(backbone, len(train.classes), images[:1])
        model.requires_grad_(True).train()
        parameters = list(model.parameters())
        optimizer = torch.optim.AdamW([
            {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
        ], lr=lr)
        steps = epochs * math.ceil(len(labels) / batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        for _ in range(epochs):
            for batch in torch.randperm(len(labels)).split(batch_size):
                loss = F.cross_entropy(model(to_float(images[batch].to(device))), labels[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return accuracy(extract_features(model, test.images, batch_size).argmax(dim=1), test.labels)
