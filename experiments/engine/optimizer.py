"""The optimizer a run's config names: Adam, AdamW, Lion or SGD with momentum from torch (float32 states),
quantlab (2- to 8-bit or 32-bit states), bitsandbytes (8-bit states) or torchao (AdamW with 4- or 8-bit
states), optionally inside torch's ZeroRedundancyOptimizer."""
from __future__ import annotations

import torch

LIBRARIES = ("torch", "quantlab", "bitsandbytes", "torchao")
STATE_BITS = (2, 3, 4, 5, 6, 7, 8, 32)
CODES = ("dynamic", "linear")
# the code of non-negative states (Adam's v): the signed states' family, or a zero-free code (no 0)
UNSIGNED_CODES = ("same", "dynamic-zero-free", "linear-zero-free")
NORMALIZATIONS = ("blockwise", "rank1")
TORCHAO_CLASSES = {4: "AdamW4bit", 8: "AdamW8bit"}  # torchao's block sizes: 128 and 256
ALGORITHMS = ("adam", "adamw", "lion", "sgd")
QUANTLAB_CLASSES = {"adam": "Adam", "adamw": "AdamW", "lion": "Lion", "sgd": "SGD"}
TORCH_CLASSES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}  # torch has no Lion
BITSANDBYTES_CLASSES = {"adam": "Adam8bit", "adamw": "AdamW8bit", "lion": "Lion8bit", "sgd": "SGD8bit"}
SSL_OPTIMIZERS = {"torch-adamw": "torch", "quantlab-adamw": "quantlab", "bnb-adamw8bit": "bitsandbytes",
                  "torchao-adamw": "torchao"}


def algorithm_hyperparameters(algorithm: str, lr: float, betas: tuple, eps: float, weight_decay: float,
                              momentum: float) -> dict:
    """The keyword arguments each algorithm takes, of a config's hyperparameters."""
    if algorithm in ("adam", "adamw"):
        return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if algorithm == "lion":
        return dict(lr=lr, betas=betas, weight_decay=weight_decay)
    return dict(lr=lr, momentum=momentum, weight_decay=weight_decay)


def check_state_settings(library: str, algorithm: str, state_bits: int, block_size: int, code: str,
                         unsigned_code: str, unsigned_normalization: str) -> None:
    """What a config's state settings must satisfy for its library (ValueError naming the setting)."""
    for name, value, choices in (("state_bits", state_bits, STATE_BITS), ("code", code, CODES),
                                 ("unsigned_code", unsigned_code, UNSIGNED_CODES),
                                 ("unsigned_normalization", unsigned_normalization, NORMALIZATIONS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    quantlab_only = (code, unsigned_code, unsigned_normalization) != ("dynamic", "same", "blockwise")
    if library == "torch" and state_bits != 32:
        raise ValueError("torch's optimizers keep float32 states: state_bits must be 32")
    if library == "bitsandbytes" and ((state_bits, block_size) != (8, 256) or quantlab_only):
        raise ValueError("bitsandbytes keeps 8-bit states in 256-element blocks with the dynamic code only; got "
                         f"state_bits={state_bits}, block_size={block_size}, code={code!r}, "
                         f"unsigned_code={unsigned_code!r}, unsigned_normalization={unsigned_normalization!r}")
    if library == "torchao" and (algorithm != "adamw" or state_bits not in TORCHAO_CLASSES or quantlab_only):
        raise ValueError("torchao is used for AdamW with 4- or 8-bit states in its own codes; got "
                         f"algorithm={algorithm!r}, state_bits={state_bits}, code={code!r}, "
                         f"unsigned_code={unsigned_code!r}, unsigned_normalization={unsigned_normalization!r}")
    if library == "quantlab" and state_bits != 32 and block_size % (8 // state_bits if state_bits in (2, 4) else 1):
        raise ValueError(f"{state_bits}-bit indices are packed {8 // state_bits} a byte: block_size must be a multiple "
                         f"of {8 // state_bits}, got {block_size}")


def optimizer_class_for(library: str, algorithm: str, hyper: dict, state_bits: int, block_size: int, code: str,
                        min_8bit_size: int, unsigned_code: str = "same",
                        unsigned_normalization: str = "blockwise") -> tuple[type, dict]:
    """(class, keyword arguments) of `algorithm` from `library`, with its state options: quantlab's
    codes of ``state_bits`` bits, ``code``'s family (the zero-free ``unsigned_code`` for non-negative
    states where given), v normalised block-wise or rank-1."""
    if library == "torch":
        if algorithm not in TORCH_CLASSES:
            raise ValueError(f"torch has no {algorithm} optimizer: use library quantlab with state_bits 32")
        return getattr(torch.optim, TORCH_CLASSES[algorithm]), hyper
    if library == "quantlab":
        import quantlab.codes
        import quantlab.optim

        bits = 8 if state_bits == 32 else state_bits  # 32-bit states take no code
        family = code if unsigned_code == "same" else unsigned_code
        return getattr(quantlab.optim, QUANTLAB_CLASSES[algorithm]), dict(
            hyper, state_bits=state_bits, block_size=block_size,
            signed_code=quantlab.codes.make_code(code, bits, signed=True),
            unsigned_code=quantlab.codes.make_code(family, bits, signed=False), min_8bit_size=min_8bit_size,
            unsigned_normalization=unsigned_normalization)
    if library == "torchao":
        import torchao.optim

        return getattr(torchao.optim, TORCHAO_CLASSES[state_bits]), hyper
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
                               config.block_size, config.code, config.min_8bit_size, config.unsigned_code,
                               config.unsigned_normalization)


def make_optimizer(config, params) -> torch.optim.Optimizer:
    """The config's optimizer over params; with shard_optimizer_state on several processes, inside
    torch's ZeroRedundancyOptimizer (ZeRO-1: each rank steps and keeps the state of its share)."""
    cls, options = optimizer_class(config)
    params = list(params)
    if config.shard_optimizer_state and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **options)
    return cls(params, **options)
