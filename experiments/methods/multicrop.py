"""Multi-crop (Caron et al. 2020, SwAV): two global crops plus small local crops of each image, with
targets computed from the global crops only; and the cross-view losses over them that SwAV and DINO
share."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
from torch import nn

from experiments.data.augment import AugmentConfig
from experiments.models.vit import VisionTransformer


@dataclass(frozen=True)
class MultiCrop:
    """Two global crops of the base view size and n_local local crops of local_crop_size pixels.
    Scales follow DINO (global (0.4, 1), local (0.05, 0.4)); local 12 px on 28 px images is DINO's 96 / 224."""
    n_local: int = 4
    local_crop_size: int = 12
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)

    def __post_init__(self):
        if not isinstance(self.n_local, int) or self.n_local < 0:
            raise ValueError(f"n_local must be an integer >= 0, got {self.n_local!r}")
        # AugmentConfig checks the size and the scale ranges (and turns config-file lists into tuples)
        local = AugmentConfig(output_size=self.local_crop_size, crop_scale=self.local_crop_scale)
        global_scale = AugmentConfig(crop_scale=self.global_crop_scale).crop_scale
        object.__setattr__(self, "local_crop_scale", local.crop_scale)
        object.__setattr__(self, "global_crop_scale", global_scale)

    @property
    def n_views(self) -> int:
        return 2 + self.n_local

    def view_configs(self, base: AugmentConfig) -> list[AugmentConfig]:
        global_view = replace(base, crop_scale=self.global_crop_scale)
        local_view = replace(base, output_size=self.local_crop_size, crop_scale=self.local_crop_scale)
        return [global_view, global_view] + [local_view] * self.n_local

    def check(self, views: list[torch.Tensor]) -> None:
        """The views are 2 global then n_local local image batches, one batch size, one shape per kind."""
        if len(views) != self.n_views:
            raise ValueError(f"expected {self.n_views} views (2 global + {self.n_local} local), got {len(views)}")
        shapes = [tuple(v.shape) for v in views]
        if any(len(s) != 4 or s[0] != shapes[0][0] for s in shapes):
            raise ValueError(f"expected image batches [B, C, H, W] of one batch size, got {shapes}")
        if shapes[1] != shapes[0] or len(set(shapes[2:])) > 1:
            raise ValueError(f"the global views must share a shape, and so must the local views; got {shapes}")


def multi_crop_for(backbone: nn.Module, n_local: int, local_crop_size: int | None,
                   global_crop_scale: tuple[float, float], local_crop_scale: tuple[float, float]) -> MultiCrop:
    """MultiCrop whose local crops the backbone can take. Our ViT has a position embedding for one image
    size and does not interpolate it, so its local crops default to, and must be, that size."""
    if isinstance(backbone, VisionTransformer):
        if local_crop_size is None:
            local_crop_size = backbone.image_size
        if n_local > 0 and local_crop_size != backbone.image_size:
            raise ValueError(f"the ViT backbone only takes {backbone.image_size}x{backbone.image_size} images "
                             f"(no position-embedding interpolation), so local crops of {local_crop_size} px "
                             f"cannot be encoded: use local_crop_size={backbone.image_size} or n_local=0")
    elif local_crop_size is None:
        local_crop_size = MultiCrop.local_crop_size
    return MultiCrop(n_local, local_crop_size, global_crop_scale, local_crop_scale)


def encode_multi_crop(encoder: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """encoder over all views -> [len(views) * B, D]: one forward per run of same-size views, since views of
    different sizes cannot share a batch."""
    runs = itertools.groupby(views, key=lambda view: view.shape)
    return torch.cat([encoder(torch.cat(list(same_size))) for _, same_size in runs])


def cross_entropy_between_views(targets: list[torch.Tensor], log_predictions: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs (i, j), j != i, of -sum_k targets[i] * log_predictions[j], averaged over the batch.
    Target view i is the same crop as prediction view i, so those pairs are skipped."""
    losses = [-(target * log_prediction).sum(dim=1).mean()
              for i, target in enumerate(targets)
              for j, log_prediction in enumerate(log_predictions) if j != i]
    return torch.stack(losses).mean()


def check_views_of_scores(name: str, targets: list[torch.Tensor], predictions: list[torch.Tensor]) -> None:
    """1 to len(predictions) target views and >= 2 prediction views, all outputs of one shape [B, K]."""
    shapes = [tuple(t.shape) for t in targets + predictions]
    if not targets or len(predictions) < 2 or len(targets) > len(predictions):
        raise ValueError(f"{name}: expected 1 to {len(predictions)} target views and >= 2 prediction views, "
                         f"got {len(targets)} and {len(predictions)}")
    if len(shapes[0]) != 2 or len(set(shapes)) > 1:
        raise ValueError(f"{name}: expected every view's outputs as one shape [B, K], got {shapes}")
