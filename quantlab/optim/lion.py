"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): one state, signed code."""
from __future__ import annotations

import numpy as np

from .. import reference
from ..kernels import scalar
from .optimizer import BlockwiseOptimizer, check_betas, check_nonnegative


class Lion(BlockwiseOptimizer):
    """Lion with decoupled weight decay; the paper suggests a learning rate 3-10x below AdamW's."""

    kind = scalar.LION

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, **state_options):
        check_nonnegative(lr=lr, weight_decay=weight_decay)
        check_betas(betas, upper_inclusive=True)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay), **state_options)

    def state_specs(self, options):
        return (("exp_avg", True),)

    def hyperparameters(self, p, options, step) -> np.ndarray:
        return reference.lion_hyperparameters(options["lr"], *options["betas"], options["weight_decay"])
