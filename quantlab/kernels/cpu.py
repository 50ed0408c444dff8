"""CPU kernels: ``numba.njit(parallel=True, cache=True)``, one parallel loop over blocks.

No fastmath: every floating-point operation is the IEEE float32 operation the reference does.
The block absmax is an integer max over the magnitude bits (it vectorises without reassociating
float maths, and a NaN or Inf in the block shows up as bits >= Inf). Loops run over block slices
indexed from 0, which lets LLVM drop negative-index handling and vectorise. The scalar maths is
inlined (``inline="always"``); Numba's on-disk cache keys on this file only, so after editing
scalar.py run ``make clean-cache``.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .scalar import INF_BITS, MAGNITUDE_BITS, compile_scalar_maths

_jit = numba.njit(cache=True, inline="always")


@_jit
def _float_of_bits(b):
    return np.int32(b).view(np.float32)


maths = compile_scalar_maths(_jit, _float_of_bits)
_block_bounds, _search = maths.block_bounds, maths.search
_round_up, _absmax_of_bits = maths.stochastic_round_up, maths.absmax_of_bits


@_jit
def _block_absmax(bits):
    """(absmax, finite) of a block from its int32 bit patterns."""
    largest = 0
    for i in range(bits.size):
        largest = max(largest, bits[i] & MAGNITUDE_BITS)
    return _absmax_of_bits(largest), largest < INF_BITS


@_jit
def _float_bits(u):
    return np.float32(u).view(np.int32)


@numba.njit(parallel=True, cache=True)
def quantize_blockwise(x, x_bits, block_size, table, points, shift, bias, zero_index, q, absmax):
    """Nearest rounding. x: float32[n], x_bits: the same memory as int32[n]; writes q, absmax."""
    for block in prange(absmax.size):
        start, end = _block_bounds(block, block_size, x.size)
        qb = q[start:end]
        scale, finite = _block_absmax(x_bits[start:end])
        absmax[block] = scale
        if scale == 0 or not finite:
            qb[:] = zero_index
            continue
        xb = x[start:end]
        for i in range(xb.size):
            u = xb[i] / scale
            qb[i] = _search(u, _float_bits(u), table, points, shift, bias)


@numba.njit(parallel=True, cache=True)
def quantize_blockwise_stochastic(x, x_bits, noise, block_size, table, points, shift, bias,
                                  values, zero_index, q, absmax):
    """Stochastic rounding with explicit uniform noise; ``table``/``points`` are the floor search."""
    for block in prange(absmax.size):
        start, end = _block_bounds(block, block_size, x.size)
        qb, nb = q[start:end], noise[start:end]
        scale, finite = _block_absmax(x_bits[start:end])
        absmax[block] = scale
        if scale == 0 or not finite:
            qb[:] = zero_index
            continue
        xb = x[start:end]
        for i in range(xb.size):
            u = xb[i] / scale
            lower = _search(u, _float_bits(u), table, points, shift, bias)
            qb[i] = lower + _round_up(u, nb[i], lower, values)


@numba.njit(parallel=True, cache=True)
def dequantize_blockwise(q, absmax, values, block_size, out):
    for block in prange(absmax.size):
        start, end = _block_bounds(block, block_size, q.size)
        qb, ob = q[start:end], out[start:end]
        scale = absmax[block]
        for i in range(qb.size):
            ob[i] = values[qb[i]] * scale


@numba.njit(parallel=True, cache=True)
def search_all(u, table, points, shift, bias, out):
    """The table search alone over many u in [-1, 1] (for the exhaustive exactness check)."""
    u_bits = u.view(np.int32)
    for i in prange(u.size):
        out[i] = _search(u[i], u_bits[i], table, points, shift, bias)
