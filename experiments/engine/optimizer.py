"""The optimizer a run's config names: Adam, AdamW, Lion or SGD with momentum from torch (float32 states),
quantlab (8- or 32-bit states) or bitsandbytes (8-bit states), optionally inside torch's
ZeroRedundancyOptimizer."""
from __future__ import annotations

import torch

LIBRARIES = ("torch", "quantlab", "bitsandbytes")
ALGORITHMS = ("adam", "adamw", "lion", "sgd")
QUANTLAB_CLASSES = {"adam": "Adam", "adamw": "AdamW", "lion": "Lion", "sgd": "SGD"}
TORCH_CLASSES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}  # torch has no Lion
BITSANDBYTES_CLASSES = {"adam": "Adam8bit", "adamw": "AdamW8bit", "lion": "Lion8bit", "sgd": "SGD8bit"}
SSL_OPTIMIZERS = {"torch-adamw": "torch", "quantlab-adamw": "quantlab", "bnb-adamw8bit": "bitsandbytes"}


def algorithm_hyperparameters(algorithm: str, lr: float, betas: tuple, eps: float, weight_decay: float,
                              momentum: float) -> dict:
    """The keyword arguments each algorithm takes, of a config's hyperparameters."""
    if algorithm in ("adam", "adamw"):
        return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if algorithm == "lion":
        return dict(lr=lr, betas=betas, weight_decay=weight_decay)
    return dict(lr=lr, momentum=momentum, weight_decay=weight_decay)


def optimizer_class_for(library: str, algorithm: str, hyper: dict, state_bits: int, block_size: int, code: str,
                        min_8bit_size: int) -> tuple[type, dict]:
    """(class, keyword arguments) of `algorithm` from `library`, with its state options."""
    if library == "torch":
        if algorithm not in TORCH_CLASSES:
            raise ValueError(f"torch has no {algorithm} optimizer: use library quantlab with state_bits 32")
        return getattr(torch.optim, TORCH_CLASSES[algorithm]), hyper
    if library == "quantlab":
        import quantlab.codes
        import quantlab.optim

        make_code = quantlab.codes.dynamic_code if code == "dynamic" else quantlab.codes.linear_code
        return getattr(quantlab.optim, QUANTLAB_CLASSES[algorithm]), dict(
            hyper, state_bits=state_bits, block_size=block_size, signed_code=make_code(signed=True),
            unsigned_code=make_code(signed=False), min_8bit_size=min_8bit_size)
    try:
        import bitsandbytes
    except ImportError as error:
        raise ValueError("library bitsandbytes needs it installed: pip install bitsandbytes") from error
    return getattr(bitsandbytes.optim, BITSANDBYTES_CLASSES[algorithm]), dict(hyper, min_8bit_size=min_8bit_size)


def optimizer_class(config) -> tuple[type, dict]:
    """AdamW as an SSL RunConfig names it, as (class, keyword arguments): torch's (float32 states),
    quantlab's or bitsandbytes' (8-bit states)."""
    hyper = algorithm_hyperparameters("adamw", config.lr, config.betas, config.eps, config.weight_decay, 0.0)
    return optimizer_class_for(SSL_OPTIMIZERS[config.optimizer], "adamw", hyper, config.state_bits,
                               config.block_size, config.code, config.min_8bit_size)


def make_optimizer(config, params) -> torch.optim.Optimizer:
    """The config's optimizer over params; with shard_optimizer_state on several processes, inside
    torch's ZeroRedundancyOptimizer (ZeRO-1: each rank steps and keeps the state of its share)."""
    cls, options = optimizer_class(config)
    params = list(params)
    if config.shard_optimizer_state and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **options)
    return cls(params, **options)
