"""RMSprop and Adagrad: their squared-gradient sums with the unsigned code (bitsandbytes uses the
signed one for every one-state optimizer, wasting half the code on negative values)."""
from __future__ import annotations

import numpy as np
import torch

from .. import reference
from ..kernels import scalar
from .optimizer import BlockwiseOptimizer, check_nonnegative


class RMSprop(BlockwiseOptimizer):
    """torch.optim.RMSprop's update (alpha, eps, weight decay, momentum or centred) with quantized
    states. Centred RMSprop with momentum (three states) and maximize raise."""

    kind = scalar.RMSPROP

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                 maximize=False, **state_options):
        check_nonnegative(lr=lr, eps=eps, momentum=momentum, weight_decay=weight_decay)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"invalid alpha {alpha}")
        if centered and momentum:
            raise ValueError("centred RMSprop with momentum needs three states, which quantlab does not support yet")
        if maximize:
            raise ValueError("maximize is not supported: negate the loss instead")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered), **state_options)

    def state_specs(self, options):
        if options["centered"]:
            return (("square_avg", False), ("grad_avg", True))
        if options["momentum"]:
            return (("square_avg", False), ("momentum_buffer", True))
        return (("square_avg", False),)

    def hyperparameters(self, p, options, step) -> np.ndarray:
        return reference.rmsprop_hyperparameters(options["lr"], options["alpha"], options["eps"],
                                                 options["weight_decay"], options["momentum"], options["centered"])


class Adagrad(BlockwiseOptimizer):
    """torch.optim.Adagrad's update (lr_decay, weight decay, initial_accumulator_value) with a
    quantized sum of squared gradients. maximize raises."""

    kind = scalar.ADAGRAD

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 maximize=False, **state_options):
        check_nonnegative(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                          initial_accumulator_value=initial_accumulator_value, eps=eps)
        if maximize:
            raise ValueError("maximize is not supported: negate the loss instead")
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                                      initial_accumulator_value=initial_accumulator_value), **state_options)

    def state_specs(self, options):
        return (("sum", False),)

    def initial_state(self, p, options, name):
        return torch.full_like(p, options["initial_accumulator_value"], dtype=torch.float32)

    def hyperparameters(self, p, options, step) -> np.ndarray:
        return reference.adagrad_hyperparameters(options["lr"], options["lr_decay"], options["eps"],
                                                 options["weight_decay"], step)
