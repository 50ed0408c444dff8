"""SGD with momentum, dampening and Nesterov momentum: the momentum buffer with the signed code."""
from __future__ import annotations

import numpy as np

from .. import reference
from ..kernels import scalar
from .optimizer import BlockwiseOptimizer, check_nonnegative


class SGD(BlockwiseOptimizer):
    """torch.optim.SGD's update with a quantized momentum buffer (no state without momentum).

    Arguments as torch.optim.SGD (maximize is refused), plus BlockwiseOptimizer's state options.
    Unlike bitsandbytes' 8-bit SGD, dampening and nesterov are honoured.
    """

    kind = scalar.SGD

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, **state_options):
        check_nonnegative(lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if maximize:
            raise ValueError("maximize is not supported: negate the loss instead")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov), **state_options)

    def state_specs(self, options):
        return (("momentum_buffer", True),) if options["momentum"] != 0 else ()

    def hyperparameters(self, p, options, step) -> np.ndarray:
        return reference.sgd_hyperparameters(options["lr"], options["momentum"], options["dampening"],
                                             options["weight_decay"], options["nesterov"], step)
