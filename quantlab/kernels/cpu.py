"""CPU kernels: ``numba.njit(parallel=True, cache=True)``, parallel loops over tasks of blocks.

No fastmath: every floating-point operation is the IEEE float32 operation the reference does.
The block absmax is an integer max over the magnitude bits (it vectorises without reassociating
float maths, and a NaN or Inf in the block shows up as bits >= Inf). Loops run over block slices
indexed from 0, which lets LLVM drop negative-index handling and vectorise; the code search runs
sixteen lanes at a time (simd.py). The per-element maths is inlined (``inline="always"``), the
block-sized helpers are called. Numba's on-disk cache keys on this file only, so after editing
scalar.py or simd.py run ``make clean-cache``.

The kernels do no bounds checks: every array size is checked by their callers (``quantlab.kernels``,
the optimizers' ``load_state_dict`` and ``step``, the NumPy wrappers of the step kernels below)
before a kernel sees it.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numba
import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

# Numba's default OpenMP layer is a second OpenMP runtime beside torch's, and the two spin-wait
# against each other: interleaved with a model's forward and backward, an 8-bit Adam step on a
# small ResNet took 1.3 s instead of 0.02 s. The workqueue layer sleeps when idle. It does not
# support parallel kernels launched from several Python threads at once; NUMBA_THREADING_LAYER
# still chooses another layer.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

from .scalar import INF_BITS, compile_scalar_maths
from .simd import LANES, largest_magnitude, quantize16

_jit = numba.njit(cache=True, inline="always")
# Block-sized work is called, not inlined: inlining it at every call site (kernel by kernel, serial
# loop and parallel loop) made the kernels compile ~5x slower (95 s against 17 s for all of them), and
# a call a block costs nothing measurable.
_block_jit = numba.njit(cache=True)
# The non-finite check over this many elements or fewer runs in a plain loop, without a parallel
# launch (~0.25 ms on this project's 2-core VM). The step kernels always launch, once for all of a
# parameter group's tensors of a kind (StepBatch): a second, serial copy of each step kernel made
# them compile twice as long.
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
def _block_absmax(bits):
    """(absmax, finite) of a block from its int32 bit patterns."""
    largest = largest_magnitude(bits)
    return _absmax_of_bits(largest), largest < INF_BITS


@_jit
def _float_bits(u):
    return np.float32(u).view(np.int32)


@_block_jit
def _quantize_into(xb, scale, search_table, qb):
    """qb[i] = the code index of xb[i] / scale (see lookup.py): sixteen lanes at a time, the tail one
    by one."""
    table, points, shift, bias = search_table
    whole = xb.size - xb.size % LANES
    for start in range(0, whole, LANES):
        quantize16(xb, scale, table, points, shift, bias, qb, start)
    for i in range(whole, xb.size):
        u = xb[i] / scale
        qb[i] = _search(u, _float_bits(u), table, points, shift, bias)


@_block_jit
def _dequantize_into(qb, values, scale, out):
    """out[i] = values[qb[i]] * scale. A plain loop: LLVM's scalar loads beat simd.py's hardware
    gather here (2.6 against 4.2 ms for 2**24 elements on this project's 2-core VM)."""
    for i in range(qb.size):
        out[i] = _dequantize(values, qb[i], scale)


@_block_jit
def _quantize_block(xb, xb_bits, qb, search_table, zero_index):
    """Nearest-round one block into qb; returns its absmax (Inf or NaN when the block is not finite).
    The divisions and the search run sixteen lanes at a time (simd.quantize16)."""
    scale, finite = _block_absmax(xb_bits)
    if scale == 0 or not finite:
        # An explicit loop, not ``qb[:] = zero_index``: Numba's parallel pass turns that slice
        # assignment into a parfor, and in adam_step_8bit (two inlined calls in one prange body)
        # the second call's fill was dropped, leaving an all-zero v block's old indices.
        for i in range(qb.size):
            qb[i] = zero_index
        return scale
    _quantize_into(xb, scale, search_table, qb)
    return scale


# Kernels that need block-sized buffers run over tasks of this many blocks, each allocating its
# buffers once: malloc and free per block were ~10 % of an 8-bit Adam step.
BLOCKS_PER_TASK = 16


@_jit
def _task_count(n_blocks):
    return (n_blocks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK


@_jit
def _task_blocks(task, n_blocks):
    """The blocks [first, last) of one task."""
    return _block_bounds(task, BLOCKS_PER_TASK, n_blocks)


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
        _quantize_into(xb, scale, search_table, qb)  # the lower neighbour
        for i in range(xb.size):
            qb[i] += _round_up(xb[i] / scale, nb[i], qb[i], values)


@numba.njit(parallel=True, cache=True)
def dequantize_blockwise(q, absmax, values, block_size, out):
    for block in prange(absmax.size):
        start, end = _block_bounds(block, block_size, q.size)
        _dequantize_into(q[start:end], values, absmax[block], out[start:end])


# --- many arrays in one launch ---------------------------------------------------------------------
# A parallel launch costs ~0.25 ms on this project's 2-core VM (waking the workqueue's threads), more
# than the work on most of a model's tensors: ResNet-18's 62 tensors, one launch each, spent more
# time launching than stepping. So the check and the step kernels take a table of arrays, as rows
# of data addresses (int64) with their sizes, and split all of them into tasks in one launch.
# Their callers guarantee every size (the wrappers below check NumPy arrays; the optimizers pass
# tensors whose sizes check_for_step has checked).

@intrinsic
def _pointer(typingctx, address):
    """An int64 address as a void pointer (for numba.carray)."""
    if address != types.int64:
        raise TypingError(f"_pointer takes an int64 address, got {address}")
    return types.voidptr(address), lambda context, builder, signature, args: builder.inttoptr(args[0],
                                                                                           cgutils.voidptr_t)


@_jit
def _array_at(address, size, dtype):
    return numba.carray(_pointer(address), size, dtype)


@_block_jit
def _first_tasks(units, per_task):
    """first[t]: the first task of array t when array t has units[t] units (elements or blocks) in
    tasks of per_task units; first[-1] is the number of tasks."""
    first = np.zeros(units.size + 1, np.int64)
    for t in range(units.size):
        first[t + 1] = first[t] + (units[t] + per_task - 1) // per_task
    return first


@_block_jit
def _task_units(task, first, units, per_task):
    """(array, first unit, end unit) of a task."""
    t = np.searchsorted(first, task, side="right") - 1
    start, end = _block_bounds(task - first[t], per_task, units[t])
    return t, start, end


CHECK_CHUNK = 1 << 16  # elements of one task of the non-finite check


@numba.njit(parallel=True, cache=True)
def _largest_magnitude_bits_of(addresses, sizes):
    first = _first_tasks(sizes, CHECK_CHUNK)
    partial = np.zeros(first[-1], np.int32)
    if sizes.sum() <= SERIAL_ELEMENTS:
        for task in range(first[-1]):
            partial[task] = _task_magnitude_bits(task, first, addresses, sizes)
    else:
        for task in prange(first[-1]):
            partial[task] = _task_magnitude_bits(task, first, addresses, sizes)
    return partial.max() if partial.size else np.int32(0)


@_block_jit
def _task_magnitude_bits(task, first, addresses, sizes):
    t, start, end = _task_units(task, first, sizes, CHECK_CHUNK)
    return largest_magnitude(_array_at(addresses[t], sizes[t], np.int32)[start:end])


def _address(a, dtype, size: int, what: str) -> int:
    """The data address of a contiguous 1-D NumPy array of this dtype and size, else ValueError."""
    if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == 1 and a.flags.c_contiguous
            and a.size == size):
        raise ValueError(f"{what} must be a contiguous 1-D {np.dtype(dtype).name} array of {size} elements, got "
                         f"{type(a).__name__} {getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}")
    return a.ctypes.data


def largest_magnitude_bits(*arrays) -> int:
    """max |x| as int32 bits over the elements of several float32 arrays, each given as a contiguous
    int32 view (>= INF_BITS when one holds NaN or Inf), in one launch."""
    addresses = np.array([_address(a, np.int32, getattr(a, "size", 0), "an array") for a in arrays], np.int64)
    return int(_largest_magnitude_bits_of(addresses, np.array([a.size for a in arrays], np.int64)))


# The step kernels are compiled once per (optimizer kind, number of states): both are closure
# variables, constants to the compiler, so LLVM drops the other kinds' branches and the state loads
# behind them, and the update loop vectorises. One generic kernel taking them as arguments ran
# 3x slower (a 2**24-element 32-bit Adam step: 35 ms against 13 ms on this project's 2-core CPU).
STEP_CHUNK = 1 << 16  # elements of one task of the 32-bit step

# Rows of the address tables: param, grad, state 1, state 2 (32-bit); param, grad, then the
# indices and absmax of state 1 and of state 2 (8-bit); an unused state's addresses are never read.


@lru_cache(maxsize=None)
def _step_32bit_kernel(kind: int, n_states: int):
    @numba.njit(parallel=True, cache=True)
    def step(addresses, sizes, hyper):
        first = _first_tasks(sizes, STEP_CHUNK)
        for task in prange(first[-1]):
            _step_32bit_task(task, first, kind, n_states, addresses, sizes, hyper)
    return step


@_jit
def _step_32bit_task(task, first, kind, n_states, addresses, sizes, hyper):
    t, start, end = _task_units(task, first, sizes, STEP_CHUNK)
    row, n = addresses[t], sizes[t]
    param, grad = _array_at(row[0], n, np.float32)[start:end], _array_at(row[1], n, np.float32)[start:end]
    s1 = _array_at(row[2], n if n_states >= 1 else 0, np.float32)[start:end]
    s2 = _array_at(row[3], n if n_states == 2 else 0, np.float32)[start:end]
    for i in range(param.size):
        a = s1[i] if n_states >= 1 else np.float32(0)
        b = s2[i] if n_states == 2 else np.float32(0)
        param[i], a, b = _update(kind, param[i], grad[i], a, b, hyper)
        if n_states >= 1:
            s1[i] = a
        if n_states == 2:
            s2[i] = b


def step_32bit_many(kind, n_states, addresses, sizes, hyper):
    """One optimizer step with float32 states (0, 1 or 2 of them), in place, on every row of
    ``addresses`` (int64[n, 4]: param, grad, s1, s2 data) with ``sizes`` (int64[n]) elements."""
    _step_32bit_kernel(int(kind), int(n_states))(addresses, sizes, hyper)


def step_32bit(kind, n_states, param, grad, s1, s2, hyper):
    """step_32bit_many on one parameter's NumPy arrays (unused state slots: any float32 arrays)."""
    n = getattr(param, "size", 0)
    row = [_address(param, np.float32, n, "param"), _address(grad, np.float32, n, "grad")]
    row += [_address(s, np.float32, n, f"state {k + 1}") if k < n_states else 0 for k, s in enumerate((s1, s2))]
    step_32bit_many(kind, n_states, np.array([row], np.int64), np.array([n], np.int64), hyper)


@lru_cache(maxsize=None)
def _step_8bit_kernel(kind: int, n_states: int):
    @numba.njit(parallel=True, cache=True)
    def step(addresses, sizes, hyper, block_size, values1, search1, zero1, values2, search2, zero2):
        blocks = (sizes + block_size - 1) // block_size
        first = _first_tasks(blocks, BLOCKS_PER_TASK)
        for task in prange(first[-1]):
            _step_8bit_task(task, first, blocks, kind, n_states, addresses, sizes, hyper, block_size,
                            values1, search1, zero1, values2, search2, zero2)
    return step


@_jit
def _step_8bit_task(task, first, blocks, kind, n_states, addresses, sizes, hyper, block_size,
                    values1, search1, zero1, values2, search2, zero2):
    """BLOCKS_PER_TASK blocks of one parameter, one pass each: dequantize the states into block-sized
    buffers, update them and the parameter in float32, requantize."""
    t, first_block, end_block = _task_units(task, first, blocks, BLOCKS_PER_TASK)
    row, n, nb = addresses[t], sizes[t], blocks[t]
    param, grad = _array_at(row[0], n, np.float32), _array_at(row[1], n, np.float32)
    q1, absmax1 = _array_at(row[2], n, np.uint8), _array_at(row[3], nb, np.float32)
    q2 = _array_at(row[4], n if n_states == 2 else 0, np.uint8)
    absmax2 = _array_at(row[5], nb if n_states == 2 else 0, np.float32)
    # with one state, s2 holds zeros that the update passes through
    buffer1, buffer2 = np.empty(block_size, np.float32), np.zeros(block_size, np.float32)
    for block in range(first_block, end_block):
        start, end = _block_bounds(block, block_size, n)
        pb, gb, q1b = param[start:end], grad[start:end], q1[start:end]
        s1, s2 = buffer1[:end - start], buffer2[:end - start]
        # The table look-ups come first, apart, so that the update loop below vectorises.
        _dequantize_into(q1b, values1, absmax1[block], s1)
        if n_states == 2:
            _dequantize_into(q2[start:end], values2, absmax2[block], s2)
        for i in range(pb.size):
            pb[i], s1[i], s2[i] = _update(kind, pb[i], gb[i], s1[i], s2[i], hyper)
        absmax1[block] = _quantize_block(s1, s1.view(np.int32), q1b, search1, zero1)
        if n_states == 2:
            absmax2[block] = _quantize_block(s2, s2.view(np.int32), q2[start:end], search2, zero2)


def step_8bit_many(kind, n_states, addresses, sizes, hyper, block_size, values1, search1, zero1,
                   values2, search2, zero2):
    """One optimizer step with 1 or 2 block-wise 8-bit states, in place, on every row of
    ``addresses`` (int64[n, 6]: param, grad, q1, absmax1, q2, absmax2 data) with ``sizes``
    (int64[n]) elements; every parameter's states in the same codes. With one state, q2/absmax2
    are not read (0 will do)."""
    _step_8bit_kernel(int(kind), int(n_states))(addresses, sizes, hyper, block_size, values1, search1, zero1,
                                                values2, search2, zero2)


def step_8bit(kind, n_states, param, grad, hyper, block_size, q1, absmax1, values1, search1, zero1,
              q2, absmax2, values2, search2, zero2):
    """step_8bit_many on one parameter's NumPy arrays. With one state, q2/absmax2 are not touched."""
    n = getattr(param, "size", 0)
    nb = -(-n // block_size)
    row = [_address(param, np.float32, n, "param"), _address(grad, np.float32, n, "grad"),
           _address(q1, np.uint8, n, "q1"), _address(absmax1, np.float32, nb, "absmax1")]
    row += [_address(q2, np.uint8, n, "q2"), _address(absmax2, np.float32, nb, "absmax2")] if n_states == 2 else [0, 0]
    step_8bit_many(kind, n_states, np.array([row], np.int64), np.array([n], np.int64), hyper, block_size,
                   values1, search1, zero1, values2, search2, zero2)


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
    for task in prange(_task_count(partial.shape[0])):
        m_buffer, v_buffer = np.empty(block_size, np.float32), np.empty(block_size, np.float32)
        first, last = _task_blocks(task, partial.shape[0])
        for block in range(first, last):
            start, end = _block_bounds(block, block_size, param.size)
            m, v = m_buffer[:end - start], v_buffer[:end - start]
            _dequantize_into(m_q[start:end], m_values, m_absmax[block], m)
            _dequantize_into(v_q[start:end], v_values, v_absmax[block], v)
            _squared_norms(param[start:end], grad[start:end], m, v, hyper, partial[block])


@numba.njit(parallel=True, cache=True)
def lamb_apply_32bit(param, grad, m, v, hyper, neg_step):
    """LAMB pass 2 (float32 states): the same moments again, p += neg_step * r, store the moments."""
    for i in prange(param.size):
        param[i], m[i], v[i] = _lamb_apply(param[i], grad[i], m[i], v[i], hyper, neg_step)


@numba.njit(parallel=True, cache=True)
def lamb_apply_8bit(param, grad, m_q, m_absmax, m_values, m_search, m_zero, v_q, v_absmax, v_values, v_search,
                    v_zero, hyper, block_size, neg_step):
    """LAMB pass 2 (8-bit states): dequantize, the same moments again, p += neg_step * r, requantize."""
    for task in prange(_task_count(m_absmax.size)):
        m_buffer, v_buffer = np.empty(block_size, np.float32), np.empty(block_size, np.float32)
        first, last = _task_blocks(task, m_absmax.size)
        for block in range(first, last):
            start, end = _block_bounds(block, block_size, param.size)
            pb, gb, mqb, vqb = param[start:end], grad[start:end], m_q[start:end], v_q[start:end]
            m, v = m_buffer[:end - start], v_buffer[:end - start]
            _dequantize_into(mqb, m_values, m_absmax[block], m)
            _dequantize_into(vqb, v_values, v_absmax[block], v)
            for i in range(pb.size):
                pb[i], m[i], v[i] = _lamb_apply(pb[i], gb[i], m[i], v[i], hyper, neg_step)
            m_absmax[block] = _quantize_block(m, m.view(np.int32), mqb, m_search, m_zero)
            v_absmax[block] = _quantize_block(v, v.view(np.int32), vqb, v_search, v_zero)


@numba.njit(parallel=True, cache=True)
def search_all(u, table, points, shift, bias, out):
    """The kernels' table search alone over many u in [-1, 1] into uint8 out (for the tests)."""
    chunk = 1 << 12
    for c in prange((u.size + chunk - 1) // chunk):
        start, end = _block_bounds(c, chunk, u.size)
        _quantize_into(u[start:end], np.float32(1), (table, points, shift, bias), out[start:end])  # u / 1 is u
