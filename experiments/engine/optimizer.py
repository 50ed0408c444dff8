"""The optimizer a run's config names: AdamW from torch (float32 states), quantlab or bitsandbytes
(8-bit states), optionally inside torch's ZeroRedundancyOptimizer."""
from __future__ import annotations

import torch

from experiments.engine.config import RunConfig


def optimizer_class(config: RunConfig) -> tuple[type, dict]:
    """AdamW as the config names it, as (class, keyword arguments): torch's (float32 states),
    quantlab's or bitsandbytes' (8-bit states)."""
    hyper = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "torch-adamw":
        return torch.optim.AdamW, hyper
    if config.optimizer == "quantlab-adamw":
        import quantlab.codes
        import quantlab.optim

        code = quantlab.codes.dynamic_code if config.code == "dynamic" else quantlab.codes.linear_code
        return quantlab.optim.AdamW, dict(hyper, state_bits=config.state_bits, block_size=config.block_size,
                                          signed_code=code(signed=True), unsigned_code=code(signed=False),
                                          min_8bit_size=config.min_8bit_size)
    try:
        import bitsandbytes
    except ImportError as error:
        raise ValueError("optimizer bnb-adamw8bit needs bitsandbytes: pip install bitsandbytes") from error
    return bitsandbytes.optim.AdamW8bit, dict(hyper, min_8bit_size=config.min_8bit_size)


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    """The config's optimizer over params; with shard_optimizer_state on several processes, inside
    torch's ZeroRedundancyOptimizer (ZeRO-1: each rank steps and keeps the state of its share)."""
    cls, options = optimizer_class(config)
    params = list(params)
    if config.shard_optimizer_state and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **options)
    return cls(params, **options)
