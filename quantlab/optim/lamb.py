"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2): Adam's moments,
the direction r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w, and a per-tensor trust ratio
||w|| / ||r||. The trust ratio needs ||r|| before any parameter moves, so a step is two passes over
the old states: pass 1 computes this step's moments and sums r**2 and w**2, writing nothing; pass 2
computes the same moments again (the same float32 operations, so the same values), applies
p -= lr * trust * r and stores (requantizes) the moments. With 8-bit states the ratio is kept
(bitsandbytes drops it on its 8-bit path), and r comes from the float32 moments, as in Adam.
States of 2 to 8 bits are block-wise only (packed as in the other optimizers), never rank-1.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import reference
from .bridge import float32_chunks, is_dtensor, kernel_array, kernels_for
from .optimizer import BlockwiseOptimizer, check_betas, check_nonnegative
from .state import QuantizedState


class LAMB(BlockwiseOptimizer):
    kind = None  # two-pass kernels of its own, not the shared step kernels

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, **state_options):
        check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
        check_betas(betas)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), **state_options)

    def state_specs(self, options):
        return (("exp_avg", True), ("exp_avg_sq", False))

    def hyperparameters(self, p, options, step) -> np.ndarray:
        if "rank1" in (options["signed_normalization"], options["unsigned_normalization"]):
            raise ValueError("LAMB keeps block-wise states: its two passes have no rank-1 variant "
                             "(signed_normalization and unsigned_normalization must be 'blockwise')")
        if is_dtensor(p):
            raise ValueError("LAMB does not step sharded (FSDP2 DTensor) parameters: its trust ratio needs the "
                             "norm of the whole update, which a rank's shard does not give")
        return reference.lamb_hyperparameters(*options["betas"], options["eps"], options["weight_decay"], step)

    def _run_kernels(self, p, state, options, specs, hyper, batch):
        # two passes per parameter (the trust ratio needs the whole update's norm): not batched
        kernels, block_size = kernels_for(p), options["block_size"]
        eight_bit = isinstance(state["exp_avg"], QuantizedState)
        partial = torch.zeros((reference.num_blocks(p.numel(), block_size), 2), dtype=torch.float64, device=p.device)

        def moments(start, end):
            if not eight_bit:
                return [kernel_array(state[name])[start:end] for name in ("exp_avg", "exp_avg_sq")]
            return [state[name].kernel_args(start, end) for name in ("exp_avg", "exp_avg_sq")]

        per_byte = (state["exp_avg"].per_byte, state["exp_avg_sq"].per_byte) if eight_bit else (1, 1)
        for start, end, param, grad in float32_chunks(p, block_size):
            m, v = moments(start, end)
            rows = partial[start // block_size:reference.num_blocks(end, block_size)]
            rows = rows if rows.is_cuda else rows.numpy()
            if eight_bit:
                kernels.lamb_norms_8bit(param, grad, *m[:3], *v[:3], hyper, block_size, rows, per_byte=per_byte)
            else:
                kernels.lamb_norms_32bit(param, grad, m, v, hyper, block_size, rows)
        sums = partial.cpu().numpy()
        r_norm, p_norm = math.sqrt(math.fsum(sums[:, 0])), math.sqrt(math.fsum(sums[:, 1]))
        trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
        neg_step = np.float32(-options["lr"] * trust)
        for start, end, param, grad in float32_chunks(p, block_size):
            m, v = moments(start, end)
            if eight_bit:
                kernels.lamb_apply_8bit(param, grad, *m, *v, hyper, block_size, neg_step, per_byte=per_byte)
            else:
                kernels.lamb_apply_32bit(param, grad, m, v, hyper, neg_step)
