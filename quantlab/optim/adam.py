"""Adam and AdamW: m with the signed code, v with the unsigned one."""
from __future__ import annotations

import numpy as np

from .. import reference
from ..kernels import scalar
from .optimizer import BlockwiseOptimizer, check_betas, check_nonnegative


class Adam(BlockwiseOptimizer):
    """torch.optim.Adam's update (L2 weight decay) with quantized states.

    Arguments as torch.optim.Adam (amsgrad and maximize are refused, not ignored), plus the state
    options of BlockwiseOptimizer: state_bits (8 or 32), block_size, signed_code / unsigned_code,
    min_8bit_size, and skip_nonfinite: by default a step whose gradients hold NaN or Inf raises
    FloatingPointError and changes nothing; with skip_nonfinite=True it is skipped and counted in
    ``skipped_steps``.
    """

    kind = scalar.ADAM
    decoupled_weight_decay = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, **state_options):
        check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
        check_betas(betas)
        if amsgrad:
            raise ValueError("amsgrad is not supported: it needs a third state")
        if maximize:
            raise ValueError("maximize is not supported: negate the loss instead")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), **state_options)

    def state_specs(self, options):
        return (("exp_avg", True), ("exp_avg_sq", False))

    def hyperparameters(self, p, options, step) -> np.ndarray:
        beta1, beta2 = options["betas"]
        return reference.adam_hyperparameters(options["lr"], beta1, beta2, options["eps"], options["weight_decay"],
                                              self.decoupled_weight_decay, step)


class AdamW(Adam):
    """torch.optim.AdamW's update (decoupled weight decay, default 1e-2) with quantized states."""

    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
