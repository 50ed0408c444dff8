"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): one state, signed code."""
from __future__ import annotations

import numpy as np

from .. import reference
from ..kernels import scalar
from .optimizer import BlockwiseOptimizer


class Lion(BlockwiseOptimizer):
    """Lion with decoupled weight decay; the paper suggests a learning rate 3-10x below AdamW's."""

    kind = scalar.LION

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, **state_options):
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] <= 1.0 and 0.0 <= betas[1] <= 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay), **state_options)

    def state_specs(self, options):
        return (("exp_avg", True),)

    def hyperparameters(self, p, options, step) -> np.ndarray:
        return reference.lion_hyperparameters(options["lr"], *options["betas"], options["weight_decay"])
