"""CPU kernels: ``numba.njit(parallel=True, cache=True)``, one parallel loop over blocks.

No fastmath: every floating-point operation is the IEEE float32 operation the reference does.
The block absmax is an integer max over the magnitude bits (it vectorises without reassociating
float maths, and a NaN or Inf in the block shows up as bits >= Inf). Loops run over block slices
indexed from 0, which lets LLVM drop negative-index handling and vectorise. The scalar maths is
inlined (``inline="always"``); Numba's on-disk cache keys on this file only, so after editing
scalar.py run ``make clean-cache``.

The kernels do no bounds checks: every array size is checked by their callers (``quantlab.kernels``,
the optimizers' ``load_state_dict`` and ``step``) before a kernel sees it.
"""
from __future__ import annotations

import os

import numba
import numpy as np
from numba import prange

# Numba's default OpenMP layer is a second OpenMP runtime beside torch's, and the two spin-wait
# against each other: interleaved with a model's forward and backward, an 8-bit Adam step on a
# small ResNet took 1.3 s instead of 0.02 s. The workqueue layer sleeps when idle. It does not
# support parallel kernels launched from several Python threads at once; NUMBA_THREADING_LAYER
# still chooses another layer.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

from .scalar import INF_BITS, MAGNITUDE_BITS, compile_scalar_maths

_jit = numba.njit(cache=True, inline="always")
# Arrays up to this size are stepped and checked in a plain loop: a parallel launch costs ~0.1 ms,
# more than the work on a bias or a norm's weight, and a model has many of those.
SERIAL_ELEMENTS = 1 << 14


@_jit
def _float_of_bits(b):
    return np.int32(b).view(np.float32)


@_jit
def _mul(a, b):
    return a * b  # never fused with an add: Numba asks LLVM for no contraction without fastmath


maths = compile_scalar_maths(_jit, _float_of_bits, _mul)
_block_bounds, _search = maths.block_bounds, maths.search
_round_up, _absmax_of_bits, _dequantize = maths.stochastic_round_up, maths.absmax_of_bits, maths.dequantize
_update, _lamb_moments, _lamb_direction, _lamb_apply = (maths.update, maths.lamb_moments, maths.lamb_direction,
                                                         maths.lamb_apply)


@_jit
def _block_absmax_bits(bits):
    largest = 0
    for i in range(bits.size):
        largest = max(largest, bits[i] & MAGNITUDE_BITS)
    return largest


@_jit
def _block_absmax(bits):
    """(absmax, finite) of a block from its int32 bit patterns."""
    largest = _block_absmax_bits(bits)
    return _absmax_of_bits(largest), largest < INF_BITS


@_jit
def _float_bits(u):
    return np.float32(u).view(np.int32)


@_jit
def _quantize_block(xb, xb_bits, qb, search_table, zero_index):
    """Nearest-round one block into qb; returns its absmax (Inf or NaN when the block is not finite).

    The divisions run as their own loop, which vectorises; the table search stays scalar (LLVM does
    not vectorise its two gathers here), so keeping divisions out of it matters."""
    table, points, shift, bias = search_table
    scale, finite = _block_absmax(xb_bits)
    if scale == 0 or not finite:
        # An explicit loop, not ``qb[:] = zero_index``: Numba's parallel pass turns that slice
        # assignment into a parfor, and in adam_step_8bit (two inlined calls in one prange body)
        # the second call's fill was dropped, leaving an all-zero v block's old indices.
        for i in range(qb.size):
            qb[i] = zero_index
        return scale
    u = np.empty(xb.size, np.float32)
    for i in range(xb.size):
        u[i] = xb[i] / scale
    u_bits = u.view(np.int32)
    for i in range(xb.size):
        qb[i] = _search(u[i], u_bits[i], table, points, shift, bias)
    return scale


@numba.njit(parallel=True, cache=True)
def quantize_blockwise(x, x_bits, block_size, search_table, zero_index, q, absmax):
    """Nearest rounding. x: float32[n], x_bits: the same memory as int32[n]; writes q, absmax.
    search_table: (table, points, shift, bias) of the code's midpoints (lookup.py)."""
    for block in prange(absmax.size):
        start, end = _block_bounds(block, block_size, x.size)
        absmax[block] = _quantize_block(x[start:end], x_bits[start:end], q[start:end], search_table, zero_index)


@numba.njit(parallel=True, cache=True)
def quantize_blockwise_stochastic(x, x_bits, noise, block_size, search_table, values, zero_index, q, absmax):
    """Stochastic rounding with explicit uniform noise; search_table is the floor search."""
    table, points, shift, bias = search_table
    for block in prange(absmax.size):
        start, end = _block_bounds(block, block_size, x.size)
        qb, nb = q[start:end], noise[start:end]
        scale, finite = _block_absmax(x_bits[start:end])
        absmax[block] = scale
        if scale == 0 or not finite:
            for i in range(qb.size):  # not qb[:] = ...: see _quantize_block
                qb[i] = zero_index
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
            ob[i] = _dequantize(values, qb[i], scale)


@numba.njit(parallel=True, cache=True)
def largest_magnitude_bits(x_bits, chunk=1 << 16):
    """max |x| as int32 bits over an array (>= INF_BITS when it holds NaN or Inf)."""
    if x_bits.size <= SERIAL_ELEMENTS:
        return np.int64(_block_absmax_bits(x_bits))
    chunks = (x_bits.size + chunk - 1) // chunk
    partial = np.zeros(chunks, np.int64)
    for c in prange(chunks):
        start, end = _block_bounds(c, chunk, x_bits.size)
        partial[c] = _block_absmax_bits(x_bits[start:end])
    return partial.max() if chunks else 0


@_jit
def _dequantize_block(qb, values, scale):
    out = np.empty(qb.size, np.float32)
    for i in range(qb.size):
        out[i] = _dequantize(values, qb[i], scale)
    return out


@_jit
def _step_element(i, kind, n_states, param, grad, s1, s2, hyper):
    a = s1[i] if n_states >= 1 else np.float32(0)
    b = s2[i] if n_states == 2 else np.float32(0)
    param[i], a, b = _update(kind, param[i], grad[i], a, b, hyper)
    if n_states >= 1:
        s1[i] = a
    if n_states == 2:
        s2[i] = b


@numba.njit(parallel=True, cache=True)
def step_32bit(kind, n_states, param, grad, s1, s2, hyper):
    """One optimizer step with float32 states (0, 1 or 2 of them), in place."""
    if param.size <= SERIAL_ELEMENTS:
        for i in range(param.size):
            _step_element(i, kind, n_states, param, grad, s1, s2, hyper)
    else:
        for i in prange(param.size):
            _step_element(i, kind, n_states, param, grad, s1, s2, hyper)


@numba.njit(parallel=True, cache=True)
def step_8bit(kind, n_states, param, grad, hyper, block_size, q1, absmax1, values1, search1, zero1,
              q2, absmax2, values2, search2, zero2):
    """One optimizer step with 1 or 2 block-wise 8-bit states, in place, one pass per block:
    dequantize the states into block-sized buffers, update them and the parameter in float32,
    requantize. With one state, q2/absmax2 are not touched."""
    if param.size <= SERIAL_ELEMENTS:
        for block in range(absmax1.size):
            _step_block(block, kind, n_states, param, grad, hyper, block_size, q1, absmax1, values1, search1, zero1,
                        q2, absmax2, values2, search2, zero2)
    else:
        for block in prange(absmax1.size):
            _step_block(block, kind, n_states, param, grad, hyper, block_size, q1, absmax1, values1, search1, zero1,
                        q2, absmax2, values2, search2, zero2)


@_jit
def _step_block(block, kind, n_states, param, grad, hyper, block_size, q1, absmax1, values1, search1, zero1,
                q2, absmax2, values2, search2, zero2):
    start, end = _block_bounds(block, block_size, param.size)
    pb, gb, q1b = param[start:end], grad[start:end], q1[start:end]
    # The table look-ups come first, apart, so that the update loop below vectorises.
    s1 = _dequantize_block(q1b, values1, absmax1[block])
    if n_states == 2:
        s2 = _dequantize_block(q2[start:end], values2, absmax2[block])
    else:
        s2 = np.zeros(pb.size, np.float32)
    for i in range(pb.size):
        pb[i], s1[i], s2[i] = _update(kind, pb[i], gb[i], s1[i], s2[i], hyper)
    absmax1[block] = _quantize_block(s1, s1.view(np.int32), q1b, search1, zero1)
    if n_states == 2:
        absmax2[block] = _quantize_block(s2, s2.view(np.int32), q2[start:end], search2, zero2)


@_jit
def _squared_norms(p, g, m, v, hyper, partial_row):
    """Sums of r**2 and p**2 over a block in float64, in element order (as the reference), with r
    from the moments this step will give (computed here, not stored)."""
    r_total, p_total = 0.0, 0.0
    for i in range(p.size):
        m_new, v_new = _lamb_moments(g[i], m[i], v[i], hyper)
        r = np.float64(_lamb_direction(p[i], m_new, v_new, hyper))
        w = np.float64(p[i])
        r_total += r * r
        p_total += w * w
    partial_row[0] = r_total
    partial_row[1] = p_total


@numba.njit(parallel=True, cache=True)
def lamb_norms_32bit(param, grad, m, v, hyper, block_size, partial):
    """LAMB pass 1 (float32 states): partial[block] = (sum r**2, sum p**2); writes nothing else."""
    for block in prange(partial.shape[0]):
        start, end = _block_bounds(block, block_size, param.size)
        _squared_norms(param[start:end], grad[start:end], m[start:end], v[start:end], hyper, partial[block])


@numba.njit(parallel=True, cache=True)
def lamb_norms_8bit(param, grad, m_q, m_absmax, m_values, v_q, v_absmax, v_values, hyper, block_size, partial):
    """LAMB pass 1 (8-bit states): as lamb_norms_32bit, from the dequantized states."""
    for block in prange(partial.shape[0]):
        start, end = _block_bounds(block, block_size, param.size)
        _squared_norms(param[start:end], grad[start:end], _dequantize_block(m_q[start:end], m_values, m_absmax[block]),
                       _dequantize_block(v_q[start:end], v_values, v_absmax[block]), hyper, partial[block])


@numba.njit(parallel=True, cache=True)
def lamb_apply_32bit(param, grad, m, v, hyper, neg_step):
    """LAMB pass 2 (float32 states): the same moments again, p += neg_step * r, store the moments."""
    for i in prange(param.size):
        param[i], m[i], v[i] = _lamb_apply(param[i], grad[i], m[i], v[i], hyper, neg_step)


@numba.njit(parallel=True, cache=True)
def lamb_apply_8bit(param, grad, m_q, m_absmax, m_values, m_search, m_zero, v_q, v_absmax, v_values, v_search,
                    v_zero, hyper, block_size, neg_step):
    """LAMB pass 2 (8-bit states): dequantize, the same moments again, p += neg_step * r, requantize."""
    for block in prange(m_absmax.size):
        start, end = _block_bounds(block, block_size, param.size)
        pb, gb, mqb, vqb = param[start:end], grad[start:end], m_q[start:end], v_q[start:end]
        m = _dequantize_block(mqb, m_values, m_absmax[block])
        v = _dequantize_block(vqb, v_values, v_absmax[block])
        for i in range(pb.size):
            pb[i], m[i], v[i] = _lamb_apply(pb[i], gb[i], m[i], v[i], hyper, neg_step)
        m_absmax[block] = _quantize_block(m, m.view(np.int32), mqb, m_search, m_zero)
        v_absmax[block] = _quantize_block(v, v.view(np.int32), vqb, v_search, v_zero)


@numba.njit(parallel=True, cache=True)
def search_all(u, table, points, shift, bias, out):
    """The table search alone over many u in [-1, 1] (for the exhaustive exactness check)."""
    u_bits = u.view(np.int32)
    for i in prange(u.size):
        out[i] = _search(u[i], u_bits[i], table, points, shift, bias)
