"""Fine-tuning: the whole backbone plus a linear head trained on labels.

- fine_tune: single-label, on a class-balanced fraction of the labels (the 100% / 25% / 12.5% label-fraction
  protocol), AdamW with a cosine schedule.
- fine_tune_multilabel: the medical-MAE protocol (Xiao et al. 2023, "Delving into Masked Autoencoders for
  Multi-Label Thorax Disease Classification"): the paper's ViT recipe, AdamW with layer-wise learning-rate
  decay 0.55 (BEiT / MAE), DropPath 0.2, RandAugment magnitude 6, linear warm-up then cosine,
  BCE-with-logits; scored by the mean over labels of the ROC AUC.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from experiments.data import ImageDataset, stratified_fraction, to_float
from experiments.data.augment import RANDAUGMENT_MAGNITUDE, RANDAUGMENT_OPS, rand_augment
from experiments.eval.checks import check_multilabel
from experiments.eval.features import extract_features, module_device
from experiments.eval.metrics import accuracy, mean_auc
from experiments.lr_schedule import set_learning_rate, warmup_cosine
from experiments.models.vit import VisionTransformer, vit_layer
from experiments.param_groups import parameter_groups


def add_linear_head(backbone: nn.Module, num_classes: int, example: torch.Tensor) -> nn.Sequential:
    """A copy of the backbone followed by a linear classifier sized by a forward pass of `example` images."""
    encoder = copy.deepcopy(backbone)
    feature_dim = extract_features(encoder, example).shape[1]
    return nn.Sequential(encoder, nn.Linear(feature_dim, num_classes, device=module_device(encoder)))


def train_whole_model(model: nn.Module, groups: list[dict], images: torch.Tensor, targets: torch.Tensor, loss_fn,
                      epochs: int, lr: float, batch_size: int, warmup_epochs: float = 0.0, augment=None) -> None:
    """The fine-tuning loop: AdamW over `groups` at peak `lr`, the warm-up + cosine schedule per step, shuffled
    batches of uint8 `images` (augment(batch) first when given) and loss_fn(model outputs, targets). Draws
    from torch's global generator: callers fork and seed it."""
    device = module_device(model)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    warmup_steps, total_steps = round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch
    model.requires_grad_(True).train()
    step = 0
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(batch_size):
            set_learning_rate(optimizer, lr, warmup_cosine(step, warmup_steps, total_steps))
            inputs = images[batch] if augment is None else augment(images[batch])
            loss = loss_fn(model(to_float(inputs.to(device))), targets[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1


def fine_tune(backbone: nn.Module, train: ImageDataset, test: ImageDataset, label_fraction: float, epochs: int,
              lr: float, seed: int, batch_size: int = 256, weight_decay: float = 0.05) -> float:
    """Test accuracy after training a copy of the backbone plus a linear head on a labelled fraction.

    The labelled examples are stratified_fraction(train.labels, label_fraction, seed). All weights
    are trained by train_whole_model (weight decay as param_groups.decays says, cosine schedule to zero,
    no warm-up) on plain to_float images. `seed` fixes the subset, the head's initialisation, the
    shuffling and any dropout; the caller's random state and backbone are left untouched.
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
        train_whole_model(model, parameter_groups(model.named_parameters(), weight_decay), images, labels,
                          F.cross_entropy, epochs, lr, batch_size)
    return accuracy(extract_features(model, test.images, batch_size).argmax(dim=1), test.labels)


def vit_and_head_layers(model: nn.Sequential) -> dict[str, int]:
    """The layer of each parameter of nn.Sequential(vit, head) for layer-wise LR decay: the ViT's own
    (models.vit.vit_layer), and the head one past the ViT's final norm (so it trains at the peak lr)."""
    vit, head = model
    depth = len(vit.blocks)
    layers = {f"0.{name}": vit_layer(name, depth) for name, _ in vit.named_parameters()}
    return {**layers, **{f"1.{name}": depth + 1 for name, _ in head.named_parameters()}}


def fine_tune_multilabel(backbone: nn.Module, train_images: torch.Tensor, train_targets: torch.Tensor,
                         test_images: torch.Tensor, test_targets: torch.Tensor, epochs: int, lr: float, seed: int,
                         layer_decay: float = 0.55, drop_path: float = 0.2, randaugment_ops: int = RANDAUGMENT_OPS,
                         randaugment_magnitude: int = RANDAUGMENT_MAGNITUDE, batch_size: int = 256,
                         weight_decay: float = 0.05, warmup_epochs: float = 5) -> dict:
    """{"mean_auc", "per_label_auc"} on the test set after fine-tuning a copy of the backbone plus a linear
    head on multi-hot targets with the paper's recipe: BCE-with-logits, AdamW with layer-wise LR decay,
    DropPath rising to `drop_path` in the last block, RandAugment on every training image, and a per-step
    schedule of linear warm-up for warmup_epochs then cosine to 0. Test scores are the logits, computed in
    eval mode without augmentation.

    A backbone other than the VisionTransformer has no layers or blocks to decay or drop: it is fine-tuned
    with one learning rate (the paper's CNN recipe), and asking it for layer_decay != 1 or drop_path != 0 is
    an error. `seed` fixes the head's initialisation, the shuffling, the augmentation and DropPath; the
    caller's random state and backbone are left untouched.
    """
    check_multilabel(train_images, train_targets, "train")
    check_multilabel(test_images, test_targets, "test")
    if train_targets.shape[1] != test_targets.shape[1]:
        raise ValueError(f"train and test have {train_targets.shape[1]} and {test_targets.shape[1]} labels")
    if epochs < 1 or lr <= 0 or batch_size < 1 or weight_decay < 0 or not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"need epochs >= 1, lr > 0, batch_size >= 1, weight_decay >= 0, 0 <= warmup_epochs <= "
                         f"epochs; got {epochs}, {lr}, {batch_size}, {weight_decay}, {warmup_epochs}")
    is_vit = isinstance(backbone, VisionTransformer)
    if not is_vit and (layer_decay != 1 or drop_path != 0):
        raise ValueError(f"layer_decay and drop_path need a VisionTransformer; for a {type(backbone).__name__} "
                         f"pass layer_decay=1 and drop_path=0 (got {layer_decay} and {drop_path})")
    device = module_device(backbone)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(seed)
        augment_generator = torch.Generator().manual_seed(seed)
        model = add_linear_head(backbone, train_targets.shape[1], train_images[:1])
        if is_vit:
            model[0].set_drop_path(drop_path)
        layers = vit_and_head_layers(model) if is_vit else None
        groups = parameter_groups(model.named_parameters(), weight_decay, layers, layer_decay)
        train_whole_model(model, groups, train_images, train_targets.float(),
                          F.binary_cross_entropy_with_logits, epochs, lr, batch_size, warmup_epochs,
                          augment=lambda batch: rand_augment(batch, augment_generator, randaugment_ops,
                                                             randaugment_magnitude))
    mean, per_label = mean_auc(extract_features(model, test_images, batch_size).cpu(), test_targets)
    return {"mean_auc": mean, "per_label_auc": per_label}
