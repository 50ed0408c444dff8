"""The learning-rate schedule of every training loop here, pretraining and fine-tuning alike: linear
warm-up, then half a cosine to zero (Loshchilov & Hutter 2017; MoCo v2, MAE)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The factor of the peak learning rate at 0-based `step`: (step + 1) / warmup_steps during the warm-up
    (so no step runs at 0), then 0.5 * (1 + cos(pi * t)) with t going from 0 at the end of the warm-up to
    1 at total_steps."""
    if not 0 <= warmup_steps <= total_steps or total_steps < 1:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got {warmup_steps} "
                         f"and {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def set_learning_rate(optimizer, peak_lr: float, factor: float) -> float:
    """Each param group's lr = peak_lr * factor * its "lr_scale" (1 unless layer-wise decay set one). A
    group whose lr is a tensor (torchao's optimizers keep it so, and refuse a float) gets it in place."""
    for group in optimizer.param_groups:
        lr = peak_lr * factor * group.get("lr_scale", 1.0)
        if hasattr(group["lr"], "fill_"):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    return peak_lr * factor
