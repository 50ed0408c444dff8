"""The image dataset type of the SSL experiments and the class-balanced sampling the evaluations use.

Images stay uint8 [N, H, W] on the CPU until `to_float`, the one place the pixel scale is defined.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True, eq=False)
class ImageDataset:
    name: str
    images: torch.Tensor  # uint8 [N, 28, 28], CPU
    labels: torch.Tensor  # int64 [N] class indices, or multi-hot float32 [N, classes] for a multi-label set
    classes: tuple[str, ...]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 3:
            raise ValueError(f"{self.name}: images must be uint8 [N, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        single = self.labels.dtype == torch.int64 and self.labels.shape == self.images.shape[:1]
        multi = self.labels.dtype == torch.float32 and self.labels.shape == (len(self.images), len(self.classes))
        if not (single or multi):
            raise ValueError(f"{self.name}: labels must be int64 [{len(self.images)}] or multi-hot float32 "
                             f"[{len(self.images)}, {len(self.classes)}], got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    @property
    def multilabel(self) -> bool:
        return self.labels.dim() == 2

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> ImageDataset:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return replace(self, images=self.images[indices], labels=self.labels[indices])


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [0, 1], on the images' device."""
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"expected uint8 [N, H, W] images, got {images.dtype} {tuple(images.shape)}")
    return images.unsqueeze(1).float() / 255


def stratified_fraction(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a random `fraction` of each class (rounded, at least one a class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    per_class = torch.clamp(torch.round(class_sizes(labels) * fraction).long(), min=1)
    return sample_per_class(labels, per_class, torch.Generator().manual_seed(seed))


def sample_per_class(labels: torch.Tensor, per_class: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of `per_class[c]` random members of each class c, without a loop over classes:
    shuffle, sort stably by class, and keep each item whose rank inside its class is small enough."""
    sizes = class_sizes(labels)
    if len(per_class) != len(sizes) or bool((per_class > sizes).any()):
        raise ValueError(f"asked for {per_class.tolist()} items of classes of sizes {sizes.tolist()}")
    shuffled = torch.randperm(len(labels), generator=generator)
    by_class = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    sorted_labels = labels[by_class]
    rank = torch.arange(len(labels)) - torch.searchsorted(sorted_labels, sorted_labels)
    return torch.sort(by_class[rank < per_class[sorted_labels]]).values


def class_sizes(labels: torch.Tensor) -> torch.Tensor:
    """How many items of each class 0 .. max(labels) there are."""
    if labels.dim() != 1 or labels.dtype != torch.int64 or len(labels) == 0 or bool((labels < 0).any()):
        raise ValueError(f"labels must be a non-empty int64 [N] tensor of class indices >= 0, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    return torch.bincount(labels)
