"""Optimizer parameter groups: which parameters are weight-decayed, and layer-wise learning-rate decay
(BEiT, MAE fine-tuning), in one place for every training loop here."""
from __future__ import annotations

from torch import nn

NO_WEIGHT_DECAY = ("cls_token", "pos_embed")  # as MAE: the ViT's embeddings are not decayed


def decays(name: str, parameter: nn.Parameter) -> bool:
    """Weight decay on matrices and kernels only: not on biases, norm scales or the cls / position
    embeddings (MAE, nanoGPT)."""
    return parameter.ndim > 1 and name.rsplit(".", 1)[-1] not in NO_WEIGHT_DECAY


def parameter_groups(named_parameters, weight_decay: float, layers: dict[str, int] | None = None,
                     layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups of (name, parameter) pairs, weight-decayed as `decays` says. With `layers` (each name's
    layer, 0 .. L), a group's "lr_scale" is layer_decay ** (L - layer), so the last layer trains at the
    peak lr (see lr_schedule.set_learning_rate); without, every scale is 1. Groups carry "layer" too."""
    if weight_decay < 0 or not 0 < layer_decay <= 1:
        raise ValueError(f"need weight_decay >= 0 and layer_decay in (0, 1], got {weight_decay} and {layer_decay}")
    named_parameters = list(named_parameters)
    layers = layers or dict.fromkeys((name for name, _ in named_parameters), 0)
    last = max(layers.values(), default=0)
    groups = {}
    for name, parameter in named_parameters:
        decay, layer = decays(name, parameter), layers[name]
        group = groups.setdefault((layer, decay), {"params": [], "lr_scale": layer_decay ** (last - layer),
                                                   "layer": layer, "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]
