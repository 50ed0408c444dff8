"""Quantization-error measures for studies: compare an original array with its reconstruction."""
from __future__ import annotations

import numpy as np

from . import reference
from .codes import Code


def _pair(x, x_hat):
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    x_hat = np.asarray(x_hat, dtype=np.float64).reshape(-1)
    if x.shape != x_hat.shape:
        raise ValueError(f"x has {x.size} elements, x_hat has {x_hat.size}")
    if x.size == 0:
        raise ValueError("error measures need at least one element")
    return x, x_hat


def mean_absolute_error(x, x_hat) -> float:
    x, x_hat = _pair(x, x_hat)
    return float(np.mean(np.abs(x - x_hat)))


def rms_error(x, x_hat) -> float:
    x, x_hat = _pair(x, x_hat)
    return float(np.sqrt(np.mean((x - x_hat) ** 2)))


def relative_error(x, x_hat) -> float:
    """||x - x_hat||_2 / ||x||_2 (0 when both are zero, inf when only x is)."""
    x, x_hat = _pair(x, x_hat)
    err, norm = np.linalg.norm(x - x_hat), np.linalg.norm(x)
    if norm == 0:
        return 0.0 if err == 0 else float("inf")
    return float(err / norm)


def per_block_rms_error(x, x_hat, block_size: int) -> np.ndarray:
    """RMS error of each block of ``block_size`` consecutive elements (the last may be shorter)."""
    x, x_hat = _pair(x, x_hat)
    block_size = reference.check_block_size(block_size)
    sq = (x - x_hat) ** 2
    starts = np.arange(0, x.size, block_size)
    counts = np.diff(np.append(starts, x.size))
    return np.sqrt(np.add.reduceat(sq, starts) / counts)


def code_usage(q, code: Code) -> np.ndarray:
    """How often each code index occurs in ``q`` (length ``len(code)``)."""
    q = reference.check_indices(q, reference.check_code(code))
    return np.bincount(q.reshape(-1), minlength=len(code))


def zero_rounding_fraction(x, x_hat) -> float:
    """Fraction of the non-zero values of ``x`` reconstructed as exactly 0 (nan if x has none)."""
    x, x_hat = _pair(x, x_hat)
    nonzero = x != 0
    if not np.any(nonzero):
        return float("nan")
    return float(np.mean(x_hat[nonzero] == 0))


def blockwise_error_summary(x, code: Code, block_size: int) -> dict:
    """Quantize ``x`` block-wise with the reference and report every measure above."""
    q, absmax = reference.quantize_blockwise(x, code, block_size)
    x_hat = reference.dequantize_blockwise(q, absmax, code, block_size)
    usage = code_usage(q, code)
    return {
        "code": code.name,
        "block_size": block_size,
        "mean_absolute_error": mean_absolute_error(x, x_hat),
        "rms_error": rms_error(x, x_hat),
        "relative_error": relative_error(x, x_hat),
        "max_block_rms_error": float(per_block_rms_error(x, x_hat, block_size).max()),
        "zero_rounding_fraction": zero_rounding_fraction(x, x_hat),
        "codes_used": int(np.count_nonzero(usage)),
    }
