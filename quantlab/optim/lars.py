"""LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks", Algorithm 1):
SGD with momentum whose learning rate is scaled per tensor by the trust ratio
eta * ||w|| / (||g|| + weight_decay * ||w||). The momentum buffer uses the signed code; the trust
ratio is honoured with 8-bit state too (bitsandbytes drops it on its 8-bit path).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import reference
from ..kernels import scalar
from .bridge import is_dtensor
from .optimizer import BlockwiseOptimizer, check_nonnegative


def norm(t: torch.Tensor) -> float:
    """The float32 norm of the whole tensor, also of an FSDP2 DTensor (whose norm is a partial
    result per rank: ``full_tensor()`` all-reduces it; a plain ``float()`` would give the local one)."""
    result = torch.linalg.vector_norm(t.detach(), dtype=torch.float32)
    return float(result.full_tensor() if is_dtensor(result) else result)


def trust_ratio(param: torch.Tensor, grad: torch.Tensor, trust_coefficient: float, weight_decay: float) -> float:
    """eta * ||w|| / (||g|| + weight_decay * ||w||), or 1 when either norm is 0 (float32 norms)."""
    w_norm, g_norm = norm(param), norm(grad)
    if w_norm == 0 or g_norm == 0:
        return 1.0
    return trust_coefficient * w_norm / (g_norm + weight_decay * w_norm)


class LARS(BlockwiseOptimizer):
    """v = momentum * v + lr * trust_ratio * (g + weight_decay * w); w = w - v.

    Exclude biases and normalisation weights from the trust ratio the usual way: a param group
    with ``trust_coefficient=None`` (plain SGD with momentum for those tensors).
    """

    kind = scalar.SGD  # the same element update as SGD with momentum, with these constants

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, **state_options):
        check_nonnegative(lr=lr, weight_decay=weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}")
        if trust_coefficient is not None and not trust_coefficient > 0:
            raise ValueError(f"invalid trust_coefficient {trust_coefficient}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient), **state_options)

    def state_specs(self, options):
        return (("momentum_buffer", True),)

    def hyperparameters(self, p, options, step) -> np.ndarray:
        ratio = 1.0
        if options["trust_coefficient"] is not None:
            ratio = trust_ratio(p, p.grad, options["trust_coefficient"], options["weight_decay"])
        return reference.lars_hyperparameters(options["lr"], options["momentum"], options["weight_decay"], ratio)
