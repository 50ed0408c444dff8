"""Frozen features of a backbone: what every evaluation starts from. Features stay on the backbone's
device, so the same code runs on CPU or GPU."""
from __future__ import annotations

import torch
import torch.nn as nn

from experiments.data import to_float


def module_device(module: nn.Module) -> torch.device:
    """Where the module's parameters live (the CPU for a module without any)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


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
