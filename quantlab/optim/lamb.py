"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2): Adam's moments,
the direction r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w, and a per-tensor trust ratio
||w|| / ||r||. The trust ratio needs ||r|| before any parameter moves, so a step is two passes over
the old states: pass 1 computes this step's moments and sums r**2 and w**2, writing nothing; pass 2
computes the same moments again (the same float32 operations, so the same values), applies
p -= lr * trust * r and stores (requantizes) the moments. With 8-bit states the ratio is kept
(bitsandbytes drops it on its 8-bit path), and r comes from the float32 moments, as in Adam.
"""
from __future__ import annotations

import math

import numpy as np

from .. import reference
from ..kernels import cpu
from .optimizer import BlockwiseOptimizer, check_betas, check_nonnegative, flat_numpy


class LAMB(BlockwiseOptimizer):
    kind = None  # two-pass kernels of its own, not the shared step kernels

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, **state_options):
        check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
        check_betas(betas)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), **state_options)

    def state_specs(self, options):
        return (("exp_avg", True), ("exp_avg_sq", False))

    def hyperparameters(self, p, options, step) -> np.ndarray:
        return reference.lamb_hyperparameters(*options["betas"], options["eps"], options["weight_decay"], step)

    def _run_kernels(self, p, state, options, specs, hyper):
        block_size = options["block_size"]
        param, grad = flat_numpy(p), flat_numpy(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
        partial = np.zeros((reference.num_blocks(param.size, block_size), 2))
        if state["format"][0] == 32:
            m, v = flat_numpy(state["exp_avg"]), flat_numpy(state["exp_avg_sq"])
            cpu.lamb_norms_32bit(param, grad, m, v, hyper, block_size, partial)
        else:
            m = self._kernel_state(state, "exp_avg", options["signed_code"])
            v = self._kernel_state(state, "exp_avg_sq", options["unsigned_code"])
            cpu.lamb_norms_8bit(param, grad, *m[:3], *v[:3], hyper, block_size, partial)
        r_norm, p_norm = math.sqrt(math.fsum(partial[:, 0])), math.sqrt(math.fsum(partial[:, 1]))
        trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
        neg_step = np.float32(-options["lr"] * trust)
        if state["format"][0] == 32:
            cpu.lamb_apply_32bit(param, grad, m, v, hyper, neg_step)
        else:
            cpu.lamb_apply_8bit(param, grad, *m, *v, hyper, block_size, neg_step)
