"""The medical-MAE evaluation protocol (Xiao et al. 2023, "Delving into Masked Autoencoders for Multi-Label
Thorax Disease Classification") on a multi-label task derived from 28x28 single-label images.

    images, targets = make_mosaics(load_dataset("fashion-mnist-subset"), n=4000, seed=0)  # 1-4 labels each
    result = fine_tune_multilabel(vit, images, targets, test_images, test_targets, epochs=..., lr=..., seed=0)
    result["mean_auc"], result["per_label_auc"]

Fine-tuning as the paper's ViT recipe: AdamW with layer-wise learning-rate decay 0.55 (BEiT / MAE), DropPath
0.2, RandAugment magnitude 6, linear warm-up then cosine, BCE-with-logits; the metric is the mean over labels
of the ROC AUC. The paper's official scripts pass timm's `--aa rand-m6-mstd0.5-inc1`: magnitude 6 on timm's
0-10 scale (the abstract names "RandAug magnitude" as one of the three factors that matter), timm's default of
2 ops per image. We use torchvision's RandAugment with num_magnitude_bins=11, so that magnitude m is m/10 of
each op's range as in timm (rotate 30 degrees, shear 0.3, translate 0.45 of the side, enhance 0.9 at m=10).
Left out of timm's variant: the magnitude noise (mstd0.5), each op's 0.5 probability and the op set
("inc1": invert, solarize-add; torchvision has identity instead).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from .backbones import VisionTransformer
from .data import ImageDataset, to_float
from .evaluate import add_linear_head, extract_features, fit_linear, module_device, standardise

RANDAUGMENT_OPS = 2  # timm's default number of ops, used by the paper's "rand-m6-mstd0.5-inc1"
RANDAUGMENT_MAGNITUDE = 6  # of 10: the "m6" in the paper's scripts
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")  # as MAE's fine-tuning: embeddings are not decayed


# ---- the multi-label task ------------------------------------------------------------------------------------

def make_mosaics(dataset: ImageDataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n mosaics, uint8 [n, H, W], each a 2x2 grid of dataset images shrunk to H/2 x W/2 by 2x2 average
    pooling (rounded half up, in integers), and their multi-hot targets float32 [n, len(dataset.classes)]:
    1 for each class among the four tiles (so 1 to 4 labels an image).

    The sources are torch.randint(len(dataset), (n, 4), generator=torch.Generator().manual_seed(seed)),
    drawn with replacement, in tile order top-left, top-right, bottom-left, bottom-right."""
    if n < 1 or len(dataset) == 0:
        raise ValueError(f"need n >= 1 and a non-empty dataset, got n={n} and {len(dataset)} images")
    height, width = dataset.images.shape[1:]
    if height % 2 or width % 2:
        raise ValueError(f"images must have even sides to be pooled 2x2, got {height}x{width}")
    sources = torch.randint(len(dataset), (n, 4), generator=torch.Generator().manual_seed(seed))
    pixels = dataset.images[sources].view(n, 4, height // 2, 2, width // 2, 2).to(torch.int32)
    tiles = (pixels.sum(dim=(3, 5)) + 2) // 4  # round(sum / 4), halves up: the same on every machine
    rows = tiles.view(n, 2, 2, height // 2, width // 2).permute(0, 1, 3, 2, 4)  # [n, tile row, y, tile col, x]
    mosaics = rows.reshape(n, height, width).to(torch.uint8)
    targets = torch.zeros(n, len(dataset.classes)).scatter_(1, dataset.labels[sources], 1.0)
    return mosaics, targets


# ---- the metric ----------------------------------------------------------------------------------------------

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


# ---- fine-tuning recipe: layer-wise LR decay, DropPath, RandAugment -----------------------------------------------

def vit_layer(name: str, depth: int) -> int:
    """Layer of a ViT parameter for layer-wise LR decay (BEiT's numbering): the embeddings are layer 0,
    block i is layer i + 1, and what follows the blocks (final norm) is layer depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def decayed_groups(named_parameters, num_layers: int, lr: float, layer_decay: float,
                   weight_decay: float) -> list[dict]:
    """AdamW groups from (name, parameter, layer) triples: lr * layer_decay ** (num_layers - layer), and weight
    decay on matrices and kernels only (not on biases, norm scales or the cls / position embeddings)."""
    groups = {}
    for name, parameter, layer in named_parameters:
        decay = parameter.ndim > 1 and name not in NO_WEIGHT_DECAY
        scale = layer_decay ** (num_layers - layer)
        group = groups.setdefault((layer, decay), {"params": [], "lr": lr * scale, "lr_scale": scale, "layer": layer,
                                                   "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def layer_decay_groups(vit: VisionTransformer, lr: float, layer_decay: float, weight_decay: float,
                       head: nn.Module | None = None) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay (BEiT, MAE fine-tuning) for a ViT and the
    head on top of it, given separately (for model = nn.Sequential(vit, head): model[0], head=model[1]).

    Layer 0 is patch_embed, cls_token and pos_embed, block i is layer i + 1, and the final norm and the head
    are layer depth + 1; each group's lr is lr * layer_decay ** (depth + 1 - layer), so the head trains at lr.
    Groups also carry their "lr_scale" and "layer"."""
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"layer-wise LR decay needs the experiments.backbones VisionTransformer, got "
                         f"{type(vit).__name__}")
    if lr <= 0 or not 0 < layer_decay <= 1 or weight_decay < 0:
        raise ValueError(f"need lr > 0, layer_decay in (0, 1], weight_decay >= 0; got {lr}, {layer_decay}, "
                         f"{weight_decay}")
    depth = len(vit.blocks)
    named = [(name, parameter, vit_layer(name, depth)) for name, parameter in vit.named_parameters()]
    if head is not None:
        named += [(f"head.{name}", parameter, depth + 1) for name, parameter in head.named_parameters()]
    return decayed_groups(named, depth + 1, lr, layer_decay, weight_decay)


def set_drop_path(vit: VisionTransformer, rate: float) -> None:
    """Stochastic depth growing linearly from 0 in the first block to `rate` in the last, as the
    VisionTransformer constructor sets it, on an existing model."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
    for block, block_rate in zip(vit.blocks, torch.linspace(0.0, rate, len(vit.blocks)).tolist()):
        block.drop_path_rate = block_rate


def rand_augment(images: torch.Tensor, generator: torch.Generator, num_ops: int = RANDAUGMENT_OPS,
                 magnitude: int = RANDAUGMENT_MAGNITUDE) -> torch.Tensor:
    """RandAugment (Cubuk et al. 2020) on uint8 [B, H, W] images, each image with its own ops: torchvision's
    RandAugment on a magnitude scale of 0-10 (see the module docstring).

    torchvision draws from torch's global generator, so the draws run in a fork of it seeded from
    `generator`: the result depends only on the generator, which advances, and the caller's global state
    is left as it was. A Python loop over images (torchvision draws one set of ops a call): for 256 images,
    0.05 s with 2 ops and 0.13 s with 6 on one CPU thread, several times that with torch on 2 threads."""
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"expected uint8 [B, H, W] images, got {images.dtype} {tuple(images.shape)}")
    if not 0 <= magnitude <= 10:
        raise ValueError(f"magnitude must be in 0..10, got {magnitude}")
    transform = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=11)
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.cat([transform(image[None]) for image in images.cpu()]).to(images.device)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1 over warmup_steps, then a half cosine to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


# ---- the two evaluations -------------------------------------------------------------------------------------

def check_multilabel(images_or_features: torch.Tensor, targets: torch.Tensor, name: str) -> None:
    if targets.ndim != 2 or len(targets) != len(images_or_features) or len(targets) == 0:
        raise ValueError(f"{name}: expected non-empty targets [N, C] for {len(images_or_features)} items, "
                         f"got {tuple(targets.shape)}")
    if not bool(((targets == 0) | (targets == 1)).all()):
        raise ValueError(f"{name}: targets must be multi-hot (0 or 1)")


def fine_tune_multilabel(backbone: nn.Module, train_images: torch.Tensor, train_targets: torch.Tensor,
                         test_images: torch.Tensor, test_targets: torch.Tensor, epochs: int, lr: float, seed: int,
                         layer_decay: float = 0.55, drop_path: float = 0.2, randaugment_ops: int = RANDAUGMENT_OPS,
                         randaugment_magnitude: int = RANDAUGMENT_MAGNITUDE, batch_size: int = 256,
                         weight_decay: float = 0.05, warmup_epochs: float = 5) -> dict:
    """{"mean_auc", "per_label_auc"} on the test set after fine-tuning a copy of the backbone plus a linear
    head on multi-hot targets with the paper's recipe: BCE-with-logits, AdamW with layer-wise LR decay
    (layer_decay_groups), DropPath rising to `drop_path` in the last block, RandAugment on every training
    image, and a per-step schedule of linear warm-up for warmup_epochs then cosine to 0. Test scores are the
    logits, computed in eval mode without augmentation.

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
        model.requires_grad_(True).train()
        encoder, head = model
        if is_vit:
            set_drop_path(encoder, drop_path)
            groups = layer_decay_groups(encoder, lr, layer_decay, weight_decay, head=head)
        else:
            groups = decayed_groups([(name, p, 0) for name, p in model.named_parameters()], 0, lr, 1.0, weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=lr)
        steps_per_epoch = math.ceil(len(train_images) / batch_size)
        warmup_steps, total_steps = round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))
        for _ in range(epochs):
            for batch in torch.randperm(len(train_images)).split(batch_size):
                images = rand_augment(train_images[batch], augment_generator, randaugment_ops, randaugment_magnitude)
                logits = model(to_float(images.to(device)))
                loss = F.binary_cross_entropy_with_logits(logits, train_targets[batch].to(device, torch.float32))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    mean, per_label = mean_auc(extract_features(model, test_images, batch_size).cpu(), test_targets)
    return {"mean_auc": mean, "per_label_auc": per_label}


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
