"""What every SSL method is: an nn.Module whose forward maps a list of augmented views of one batch to a
scalar loss; `backbone` is the encoder that evaluation uses afterwards."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from experiments.data.augment import AugmentConfig


class SSLMethod(nn.Module):
    """Defaults for a two-view method without schedules whose every trainable parameter gets gradients."""

    # DistributedDataParallel must search each step's graph for parameters without gradients only
    # when a method can leave some out (SwAV's frozen prototypes)
    may_leave_parameters_unused = False

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def view_configs(self, base: AugmentConfig) -> list[AugmentConfig]:
        """The augmentation of each view that forward expects."""
        return [base, base]

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step, for schedules (momentum, temperature, ...)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: momentum encoders and other frozen copies are left out."""
        return [p for p in self.parameters() if p.requires_grad]


def two_views(views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of one batch, checked to be a pair of image batches of the same shape."""
    if len(views) != 2:
        raise ValueError(f"expected 2 views, got {len(views)}")
    first, second = views
    if first.dim() != 4 or first.shape != second.shape:
        raise ValueError(f"expected two image batches [B, C, H, W] of one shape, got "
                         f"{list(first.shape)} and {list(second.shape)}")
    return first, second
