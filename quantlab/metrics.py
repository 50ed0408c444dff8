"""Quantization-error measures: compare an original array ``x`` with its reconstruction ``x_hat``.

Every scalar measure is a function ``measure(x, x_hat) -> float``; both arguments are flattened and
compared in float64. :func:`error_measures` computes several of them, by name, from one float64
conversion of the pair (what the studies in :mod:`quantlab.analysis` use on many small tensors).
To serve both, each measure is written once on the prepared arrays (``x``, ``x_hat`` and
``diff = x - x_hat``) and ``@_measure`` publishes it as ``measure(x, x_hat)``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

from . import reference
from .codes import Code

# name -> measure on prepared arrays (flat float64 x, x_hat and diff = x - x_hat), filled by @_measure
_ON_PREPARED: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {}


def _prepare(x, x_hat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    x_hat = np.asarray(x_hat, dtype=np.float64).reshape(-1)
    if x.shape != x_hat.shape:
        raise ValueError(f"x has {x.size} elements, x_hat has {x_hat.size}")
    if x.size == 0:
        raise ValueError("error measures need at least one element")
    return x, x_hat, x - x_hat


def _measure(on_prepared: Callable[[np.ndarray, np.ndarray, np.ndarray], float]) -> Callable[..., float]:
    """Register ``on_prepared(x, x_hat, diff)`` for :func:`error_measures` under its name and return
    the public ``measure(x, x_hat)``, which prepares the arrays itself."""
    _ON_PREPARED[on_prepared.__name__] = on_prepared

    def measure(x, x_hat) -> float:
        return on_prepared(*_prepare(x, x_hat))

    measure.__name__ = measure.__qualname__ = on_prepared.__name__
    measure.__doc__ = on_prepared.__doc__
    return measure


def _norm(a: np.ndarray) -> float:
    # not np.linalg.norm: its multithreaded BLAS dot is slow on small vectors on a busy machine
    return math.sqrt(float(np.einsum("i,i->", a, a)))


def _ratio(error: float, scale: float) -> float:
    """error / scale, where a zero scale gives 0 for a zero error and inf otherwise."""
    if error == 0:
        return 0.0
    return error / scale if scale else math.inf


@_measure
def mean_absolute_error(x, x_hat, diff) -> float:
    """mean |x - x_hat|."""
    return float(np.mean(np.abs(diff)))


@_measure
def rms_error(x, x_hat, diff) -> float:
    """sqrt(mean (x - x_hat)^2)."""
    return _norm(diff) / math.sqrt(diff.size)


@_measure
def relative_error(x, x_hat, diff) -> float:
    """||x - x_hat||_2 / ||x||_2 (0 when both are zero, inf when only x is)."""
    return _ratio(_norm(diff), _norm(x))


@_measure
def max_abs_error(x, x_hat, diff) -> float:
    """max |x - x_hat|."""
    return float(np.max(np.abs(diff)))


@_measure
def max_relative_error(x, x_hat, diff) -> float:
    """max |x - x_hat| / max |x|: the largest error as a fraction of the largest magnitude (0 when
    both are zero, inf when only x is)."""
    return _ratio(float(np.max(np.abs(diff))), float(np.max(np.abs(x))))


@_measure
def zero_rounding_fraction(x, x_hat, diff) -> float:
    """Fraction of the non-zero values of ``x`` reconstructed as exactly 0 (nan if x has none)."""
    nonzero = x != 0
    if not np.any(nonzero):
        return math.nan
    return float(np.mean(x_hat[nonzero] == 0))


MEASURES = tuple(_ON_PREPARED)  # the names error_measures accepts
DEFAULT_MEASURES = ("relative_error", "rms_error", "max_abs_error", "zero_rounding_fraction")


def error_measures(x, x_hat, names: Iterable[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """``{name: measure(x, x_hat)}`` for each name (from ``MEASURES``), converting the pair to
    float64 once for all of them."""
    names = tuple(names)
    unknown = [name for name in names if name not in _ON_PREPARED]
    if unknown:
        raise ValueError(f"unknown error measures {unknown}; choose from {MEASURES}")
    prepared = _prepare(x, x_hat)
    return {name: _ON_PREPARED[name](*prepared) for name in names}


def per_block_rms_error(x, x_hat, block_size: int) -> np.ndarray:
    """RMS error of each block of ``block_size`` consecutive elements (the last may be shorter)."""
    x, x_hat, diff = _prepare(x, x_hat)
    block_size = reference.check_block_size(block_size)
    starts = np.arange(0, x.size, block_size)
    counts = np.diff(np.append(starts, x.size))
    return np.sqrt(np.add.reduceat(diff**2, starts) / counts)


def code_usage(q, code: Code) -> np.ndarray:
    """How often each code index occurs in ``q`` (length ``len(code)``)."""
    q = reference.check_indices(q, reference.check_code(code))
    return np.bincount(q.reshape(-1), minlength=len(code))


def blockwise_error_summary(x, code: Code, block_size: int) -> dict:
    """Quantize ``x`` block-wise with the reference and report the errors and the codes used."""
    q, absmax = reference.quantize_blockwise(x, code, block_size)
    x_hat = reference.dequantize_blockwise(q, absmax, code, block_size)
    errors = error_measures(x, x_hat, ("mean_absolute_error", "rms_error", "relative_error",
                                       "zero_rounding_fraction"))
    return {
        "code": code.name,
        "block_size": block_size,
        "mean_absolute_error": errors["mean_absolute_error"],
        "rms_error": errors["rms_error"],
        "relative_error": errors["relative_error"],
        "max_block_rms_error": float(per_block_rms_error(x, x_hat, block_size).max()),
        "zero_rounding_fraction": errors["zero_rounding_fraction"],
        "codes_used": int(np.count_nonzero(code_usage(q, code))),
    }
