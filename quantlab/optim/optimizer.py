"""What every quantlab optimizer shares: options per parameter, the non-finite gradient check, and
the torch <-> kernel bridge (CPU float32 tensors are handed to Numba as zero-copy NumPy views).

Options resolve, for each parameter at each step, as: the optimizer's defaults, then its param
group's values, then what ``set_options(param, ...)`` recorded on the parameter itself. Options
live on the parameter, so they apply whatever the order of calls (before or after the optimizer
is built, before or after its first step); a state whose precision no longer matches is
converted at the next step.
"""
from __future__ import annotations

import torch

from ..codes import Code
from ..kernels import cpu
from ..kernels.scalar import INF_BITS

STATE_OPTIONS = ("state_bits", "block_size", "signed_code", "unsigned_code", "min_8bit_size")
_OPTIONS_ATTRIBUTE = "_quantlab_options"


def set_options(param: torch.Tensor, **options) -> None:
    """Per-parameter overrides, e.g. ``set_options(embedding.weight, state_bits=32)``.

    Takes the state options (state_bits, block_size, signed_code, unsigned_code, min_8bit_size)
    and any hyperparameter of the optimizer's param groups (lr, weight_decay, ...).
    """
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"set_options takes a parameter tensor, got {type(param).__name__}")
    if "state_bits" in options and options["state_bits"] not in (8, 32):
        raise ValueError(f"state_bits must be 8 or 32, got {options['state_bits']!r}")
    merged = dict(getattr(param, _OPTIONS_ATTRIBUTE, {}))
    merged.update(options)
    setattr(param, _OPTIONS_ATTRIBUTE, merged)


def param_options(param: torch.Tensor, group: dict) -> dict:
    overrides = getattr(param, _OPTIONS_ATTRIBUTE, {})
    unknown = set(overrides) - set(group)
    if unknown:
        raise ValueError(f"set_options gave {sorted(unknown)}, which this optimizer does not have")
    return {**group, **overrides}


def check_state_options(state_bits, block_size, signed_code, unsigned_code, min_8bit_size) -> None:
    if state_bits not in (8, 32):
        raise ValueError(f"state_bits must be 8 or 32, got {state_bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    for name, code in (("signed_code", signed_code), ("unsigned_code", unsigned_code)):
        if not isinstance(code, Code):
            raise TypeError(f"{name} must be a quantlab Code, got {type(code).__name__}")
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be a non-negative integer, got {min_8bit_size!r}")


def check_param(param: torch.Tensor) -> None:
    """The kernels this release has: dense float32 CPU parameters and gradients."""
    if param.grad.is_sparse:
        raise RuntimeError("quantlab optimizers do not support sparse gradients")
    if param.device.type != "cpu":
        raise NotImplementedError(f"quantlab optimizers run on the CPU in this release, got {param.device}")
    if param.dtype != torch.float32 or param.grad.dtype != torch.float32:
        raise NotImplementedError(f"quantlab optimizers take float32 parameters and gradients in this "
                                  f"release, got {param.dtype} / {param.grad.dtype}")


def flat_numpy(t: torch.Tensor):
    """A zero-copy flat NumPy view of a contiguous CPU tensor."""
    if not t.is_contiguous():
        raise ValueError("quantlab optimizer states and parameters must be contiguous")
    return t.detach().view(-1).numpy()


def gradients_finite(params) -> bool:
    """One integer-max pass over each gradient (see kernels.cpu.largest_magnitude_bits)."""
    for p in params:
        g = p.grad.detach()
        g = g if g.is_contiguous() else g.contiguous()
        if cpu.largest_magnitude_bits(g.view(-1).view(torch.int32).numpy()) >= INF_BITS:
            return False
    return True
