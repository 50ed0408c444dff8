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

from .scalar import INF_BITS, MAGNITUDE_BITS, compile_scalar_maths
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


# --- packed indices (codes of 2 or 4 bits: reference.pack_indices) ---------------------------------
# A block of a packed state starts on a byte (block sizes are whole bytes of indices, checked by the
# callers), so tasks of whole blocks never share a byte.

@_jit
def _unpack_into(packed, per_byte, qb):
    """qb[i] = index i of the packed bytes (``per_byte`` indices a byte, low bits first)."""
    bits = 8 // per_byte
    mask = (1 << bits) - 1
    for i in range(qb.size):
        qb[i] = (packed[i // per_byte] >> ((i % per_byte) * bits)) & mask


@_jit
def _pack_from(qb, per_byte, packed):
    """The inverse of _unpack_into; the unused high bits of a last, partial byte are 0."""
    bits = 8 // per_byte
    for j in range(packed.size):
        byte = 0
        for k in range(per_byte):
            i = j * per_byte + k
            if i < qb.size:
                byte |= np.int64(qb[i]) << (k * bits)
        packed[j] = byte


PACK_CHUNK = 1 << 16  # indices of one task of pack_indices / unpack_indices (a multiple of every per_byte)


@numba.njit(parallel=True, cache=True)
def pack_indices(q, per_byte, packed):
    """reference.pack_indices: q (uint8[n]) into packed (uint8[ceil(n / per_byte)])."""
    for chunk in prange((q.size + PACK_CHUNK - 1) // PACK_CHUNK):
        start, end = _block_bounds(chunk, PACK_CHUNK, q.size)
        _pack_from(q[start:end], per_byte, packed[start // per_byte:(end + per_byte - 1) // per_byte])


@numba.njit(parallel=True, cache=True)
def unpack_indices(packed, per_byte, q):
    """reference.unpack_indices: packed into q (uint8[n])."""
    for chunk in prange((q.size + PACK_CHUNK - 1) // PACK_CHUNK):
        start, end = _block_bounds(chunk, PACK_CHUNK, q.size)
        _unpack_into(packed[start // per_byte:(end + per_byte - 1) // per_byte], per_byte, q[start:end])


@_jit
def _packed_slice(q, start, end, per_byte):
    """The bytes that hold indices [start, end) (start on a byte)."""
    return q[start // per_byte:(end + per_byte - 1) // per_byte]


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
def _step_8bit_kernel(kind: int, n_states: int, per_byte1: int, per_byte2: int):
    @numba.njit(parallel=True, cache=True)
    def step(addresses, sizes, hyper, block_size, values1, search1, zero1, values2, search2, zero2):
        blocks = (sizes + block_size - 1) // block_size
        first = _first_tasks(blocks, BLOCKS_PER_TASK)
        for task in prange(first[-1]):
            _step_8bit_task(task, first, blocks, kind, n_states, per_byte1, per_byte2, addresses, sizes, hyper,
                            block_size, values1, search1, zero1, values2, search2, zero2)
    return step


@_jit
def _block_indices(q, start, end, per_byte, buffer):
    """The indices of a block to work on: the state's own memory (one a byte), or ``buffer`` with
    the block's indices unpacked into it (write them back with _store_block_indices)."""
    if per_byte == 1:
        return q[start:end]
    qb = buffer[:end - start]
    _unpack_into(_packed_slice(q, start, end, per_byte), per_byte, qb)
    return qb


@_jit
def _store_block_indices(qb, q, start, end, per_byte):
    if per_byte > 1:
        _pack_from(qb, per_byte, _packed_slice(q, start, end, per_byte))


@_jit
def _step_8bit_task(task, first, blocks, kind, n_states, per_byte1, per_byte2, addresses, sizes, hyper, block_size,
                    values1, search1, zero1, values2, search2, zero2):
    """BLOCKS_PER_TASK blocks of one parameter, one pass each: dequantize the states into block-sized
    buffers, update them and the parameter in float32, requantize (packed states: unpacked into a
    block buffer first, packed back after)."""
    t, first_block, end_block = _task_units(task, first, blocks, BLOCKS_PER_TASK)
    row, n, nb = addresses[t], sizes[t], blocks[t]
    param, grad = _array_at(row[0], n, np.float32), _array_at(row[1], n, np.float32)
    q1, absmax1 = _array_at(row[2], (n + per_byte1 - 1) // per_byte1, np.uint8), _array_at(row[3], nb, np.float32)
    q2 = _array_at(row[4], (n + per_byte2 - 1) // per_byte2 if n_states == 2 else 0, np.uint8)
    absmax2 = _array_at(row[5], nb if n_states == 2 else 0, np.float32)
    # with one state, s2 holds zeros that the update passes through
    buffer1, buffer2 = np.empty(block_size, np.float32), np.zeros(block_size, np.float32)
    index_buffer1 = np.empty(block_size if per_byte1 > 1 else 0, np.uint8)
    index_buffer2 = np.empty(block_size if per_byte2 > 1 else 0, np.uint8)
    for block in range(first_block, end_block):
        start, end = _block_bounds(block, block_size, n)
        pb, gb = param[start:end], grad[start:end]
        q1b = _block_indices(q1, start, end, per_byte1, index_buffer1)
        s1, s2 = buffer1[:end - start], buffer2[:end - start]
        # The table look-ups come first, apart, so that the update loop below vectorises.
        _dequantize_into(q1b, values1, absmax1[block], s1)
        if n_states == 2:
            q2b = _block_indices(q2, start, end, per_byte2, index_buffer2)
            _dequantize_into(q2b, values2, absmax2[block], s2)
        for i in range(pb.size):
            pb[i], s1[i], s2[i] = _update(kind, pb[i], gb[i], s1[i], s2[i], hyper)
        absmax1[block] = _quantize_block(s1, s1.view(np.int32), q1b, search1, zero1)
        _store_block_indices(q1b, q1, start, end, per_byte1)
        if n_states == 2:
            absmax2[block] = _quantize_block(s2, s2.view(np.int32), q2b, search2, zero2)
            _store_block_indices(q2b, q2, start, end, per_byte2)


def _check_per_byte(per_byte, block_size):
    per_byte = tuple(int(k) for k in per_byte)
    if len(per_byte) != 2 or any(k not in (1, 2, 4) for k in per_byte):
        raise ValueError(f"per_byte must be two of 1, 2 or 4 (indices a byte), got {per_byte}")
    if any(block_size % k for k in per_byte):
        raise ValueError(f"a block of packed indices must fill whole bytes: block size {block_size}, "
                         f"per_byte {per_byte}")
    return per_byte


def step_8bit_many(kind, n_states, addresses, sizes, hyper, block_size, values1, search1, zero1,
                   values2, search2, zero2, per_byte=(1, 1)):
    """One optimizer step with 1 or 2 block-wise quantized states, in place, on every row of
    ``addresses`` (int64[n, 6]: param, grad, q1, absmax1, q2, absmax2 data) with ``sizes``
    (int64[n]) elements; every parameter's states in the same codes. ``per_byte``: indices a byte of
    each state (1, or 2 and 4 for packed 4- and 2-bit codes, reference.pack_indices); q holds
    ceil(n / per_byte) bytes. With one state, q2/absmax2 are not read (0 will do)."""
    per_byte = _check_per_byte(per_byte, block_size)
    _step_8bit_kernel(int(kind), int(n_states), *per_byte)(addresses, sizes, hyper, block_size, values1, search1,
                                                           zero1, values2, search2, zero2)


def step_8bit(kind, n_states, param, grad, hyper, block_size, q1, absmax1, values1, search1, zero1,
              q2, absmax2, values2, search2, zero2, per_byte=(1, 1)):
    """step_8bit_many on one parameter's NumPy arrays. With one state, q2/absmax2 are not touched."""
    n = getattr(param, "size", 0)
    nb = -(-n // block_size)
    per_byte = _check_per_byte(per_byte, block_size)
    row = [_address(param, np.float32, n, "param"), _address(grad, np.float32, n, "grad"),
           _address(q1, np.uint8, -(-n // per_byte[0]), "q1"), _address(absmax1, np.float32, nb, "absmax1")]
    row += ([_address(q2, np.uint8, -(-n // per_byte[1]), "q2"), _address(absmax2, np.float32, nb, "absmax2")]
            if n_states == 2 else [0, 0])
    step_8bit_many(kind, n_states, np.array([row], np.int64), np.array([n], np.int64), hyper, block_size,
                   values1, search1, zero1, values2, search2, zero2, per_byte)


# --- rank-1 normalisation (reference.quantize_rank1) ----------------------------------------------
# A state viewed as a (rows, cols) matrix: element k, at (k // cols, k % cols), is scaled by
# min(row max, column max) of |x|. The maxima are int32 magnitude bits (non-negative floats order as
# their bits), gathered per stripe of consecutive tasks (one stripe a thread) and reduced after the
# loop: a maximum is exact in any order, so the split cannot change a bit. The extra memory is
# threads * (rows + cols) int32s, the maxima themselves times the thread count. (Stripes, not
# numba.get_thread_id: a kernel that calls it cannot be cached on disk.)
RANK1_CHUNK = 1 << 14  # elements of one task of quantize_rank1 / dequantize_rank1 (whole bytes of indices)


@_jit
def _fold_rank1(bits, first, cols, row_bits, col_bits):
    """Fold the magnitude bits of elements first .. first + bits.size - 1 into the row and column maxima."""
    r, c = first // cols, first % cols
    for i in range(bits.size):
        b = bits[i] & MAGNITUDE_BITS
        if b > row_bits[r]:
            row_bits[r] = b
        if b > col_bits[c]:
            col_bits[c] = b
        c += 1
        if c == cols:
            c, r = 0, r + 1


@_jit
def _thread_maxima(partial):
    """The maximum over threads (rows of partial) of each column."""
    out = np.zeros(partial.shape[1], np.int32)
    for t in range(partial.shape[0]):
        for j in range(partial.shape[1]):
            if partial[t, j] > out[j]:
                out[j] = partial[t, j]
    return out


@_jit
def _dequantize_rank1_into(qb, values, row_max, col_max, first, cols, out):
    """out[i] = values[qb[i]] * min(row max, column max) of element first + i."""
    r, c = first // cols, first % cols
    for i in range(qb.size):
        a, b = row_max[r], col_max[c]
        out[i] = _dequantize(values, qb[i], a if a < b else b)
        c += 1
        if c == cols:
            c, r = 0, r + 1


@_jit
def _quantize_rank1_into(xb, row_bits, col_bits, first, cols, search_table, qb, ub):
    """qb[i] = the nearest index of xb[i] / min(row max, column max) (maxima as magnitude bits); the
    zero index where that scale is 0 (or not finite). The quotients go to ub (xb's size, xb itself
    will do), then the sixteen-lane search runs on them with scale 1 (u / 1 is u): u = +0 finds the
    zero index, the count of decision points below 0 (0 for a zero-free code)."""
    r, c = first // cols, first % cols
    for i in range(xb.size):
        a, b = row_bits[r], col_bits[c]
        scale_bits = a if a < b else b
        ub[i] = np.float32(0) if scale_bits == 0 or scale_bits >= INF_BITS else xb[i] / _absmax_of_bits(scale_bits)
        c += 1
        if c == cols:
            c, r = 0, r + 1
    _quantize_into(ub, np.float32(1), search_table, qb)


@_jit
def _stripe_tasks(stripe, stripes, tasks):
    """The tasks [first, last) of one stripe of ``stripes``."""
    per_stripe = (tasks + stripes - 1) // stripes
    return _block_bounds(stripe, per_stripe, tasks) if stripe * per_stripe < tasks else (tasks, tasks)


@numba.njit(parallel=True, cache=True)
def _quantize_rank1(x, x_bits, cols, search_table, per_byte, q, row_max, col_max, stripes):
    tasks = (x.size + RANK1_CHUNK - 1) // RANK1_CHUNK
    row_partial = np.zeros((stripes, row_max.size), np.int32)
    col_partial = np.zeros((stripes, cols), np.int32)
    for stripe in prange(stripes):
        first, last = _stripe_tasks(stripe, stripes, tasks)
        for task in range(first, last):
            start, end = _block_bounds(task, RANK1_CHUNK, x.size)
            _fold_rank1(x_bits[start:end], start, cols, row_partial[stripe], col_partial[stripe])
    row_bits, col_bits = _thread_maxima(row_partial), _thread_maxima(col_partial)
    for task in prange(tasks):
        start, end = _block_bounds(task, RANK1_CHUNK, x.size)
        qb = _block_indices(q, start, end, per_byte, np.empty(RANK1_CHUNK if per_byte > 1 else 0, np.uint8))
        _quantize_rank1_into(x[start:end], row_bits, col_bits, start, cols, search_table, qb,
                             np.empty(end - start, np.float32))
        _store_block_indices(qb, q, start, end, per_byte)
    row_max[:] = row_bits.view(np.float32)
    col_max[:] = col_bits.view(np.float32)


def quantize_rank1(x, x_bits, search_table, zero_index, per_byte, q, row_max, col_max):
    """reference.quantize_rank1 of x (float32[n], x_bits: its int32 view) as a (row_max.size,
    col_max.size) matrix: writes q (ceil(n / per_byte) bytes: indices packed per_byte a byte) and
    the maxima (Inf or NaN where x is not finite)."""
    rows, cols = row_max.size, col_max.size
    _address(x_bits, np.int32, x.size, "x_bits")
    if rows * cols != x.size or x.size == 0 or per_byte not in (1, 2, 4):
        raise ValueError(f"{x.size} elements are not a {rows} x {cols} matrix (or per_byte {per_byte} is not 1, 2, 4)")
    for a, dtype, size, what in ((q, np.uint8, -(-x.size // per_byte), "q"), (row_max, np.float32, rows, "row_max"),
                                 (col_max, np.float32, cols, "col_max")):
        _address(a, dtype, size, what)
    # zero_index: as the CUDA kernel takes it; here the search finds it from u = 0 (_quantize_rank1_into)
    _quantize_rank1(x, x_bits, cols, search_table, per_byte, q, row_max, col_max, numba.get_num_threads())


@numba.njit(parallel=True, cache=True)
def _dequantize_rank1(q, row_max, col_max, values, per_byte, out):
    for task in prange((out.size + RANK1_CHUNK - 1) // RANK1_CHUNK):
        start, end = _block_bounds(task, RANK1_CHUNK, out.size)
        qb = _block_indices(q, start, end, per_byte, np.empty(RANK1_CHUNK if per_byte > 1 else 0, np.uint8))
        _dequantize_rank1_into(qb, values, row_max, col_max, start, col_max.size, out[start:end])


def dequantize_rank1(q, row_max, col_max, values, per_byte, out):
    """reference.dequantize_rank1 into out (float32[rows * cols]); q packed per_byte a byte."""
    rows, cols = row_max.size, col_max.size
    if rows * cols != out.size or per_byte not in (1, 2, 4):
        raise ValueError(f"out has {out.size} elements, not {rows} x {cols} (or per_byte {per_byte} is not 1, 2, 4)")
    for a, dtype, size, what in ((q, np.uint8, -(-out.size // per_byte), "q"), (row_max, np.float32, rows, "row_max"),
                                 (col_max, np.float32, cols, "col_max"), (out, np.float32, out.size, "out")):
        _address(a, dtype, size, what)
    _dequantize_rank1(q, row_max, col_max, values, per_byte, out)


@_jit
def _dequantize_state_into(qb, values, scale_a, scale_b, rank1, block, start, out):
    """A block of a state into out: block-wise (scale_a: absmax) or rank-1 (scale_a, scale_b: row and
    column maxima)."""
    if rank1:
        _dequantize_rank1_into(qb, values, scale_a, scale_b, start, scale_b.size, out)
    else:
        _dequantize_into(qb, values, scale_a[block], out)


@lru_cache(maxsize=None)
def _step_rank1_kernel(kind: int, n_states: int, per_byte1: int, per_byte2: int, rank1_1: bool, rank1_2: bool):
    two = n_states == 2

    @numba.njit(parallel=True, cache=True)
    def step(param, grad, hyper, block_size, q1, a1, b1, values1, search1, zero1, q2, a2, b2, values2, search2, zero2,
             stripes):
        n = param.size
        tasks = _task_count((n + block_size - 1) // block_size)
        rows1, cols1 = (a1.size, b1.size) if rank1_1 else (0, 0)
        rows2, cols2 = (a2.size, b2.size) if rank1_2 else (0, 0)
        row_partial1, col_partial1 = np.zeros((stripes, rows1), np.int32), np.zeros((stripes, cols1), np.int32)
        row_partial2, col_partial2 = np.zeros((stripes, rows2), np.int32), np.zeros((stripes, cols2), np.int32)
        # Pass 1: this step's states, computed and dropped, for the new maxima of the rank-1 ones.
        for t in prange(stripes):
            buffer1, buffer2 = np.empty(block_size, np.float32), np.zeros(block_size, np.float32)
            index_buffer1, index_buffer2 = np.empty(block_size, np.uint8), np.empty(block_size, np.uint8)
            first_task, last_task = _stripe_tasks(t, stripes, tasks)
            first = first_task * BLOCKS_PER_TASK
            last = min(last_task * BLOCKS_PER_TASK, (n + block_size - 1) // block_size)
            for block in range(first, last):
                start, end = _block_bounds(block, block_size, n)
                s1, s2 = buffer1[:end - start], buffer2[:end - start]
                _dequantize_state_into(_block_indices(q1, start, end, per_byte1, index_buffer1), values1, a1, b1,
                                       rank1_1, block, start, s1)
                if two:
                    _dequantize_state_into(_block_indices(q2, start, end, per_byte2, index_buffer2), values2, a2,
                                           b2, rank1_2, block, start, s2)
                for i in range(s1.size):
                    _, s1[i], s2[i] = _update(kind, param[start + i], grad[start + i], s1[i], s2[i], hyper)
                if rank1_1:
                    _fold_rank1(s1.view(np.int32), start, cols1, row_partial1[t], col_partial1[t])
                if rank1_2:
                    _fold_rank1(s2.view(np.int32), start, cols2, row_partial2[t], col_partial2[t])
        row_bits1, col_bits1 = _thread_maxima(row_partial1), _thread_maxima(col_partial1)
        row_bits2, col_bits2 = _thread_maxima(row_partial2), _thread_maxima(col_partial2)
        # Pass 2: the same states again (the same float32 operations, the same values), the parameter
        # written, each state requantized: block-wise, or with the new rank-1 maxima.
        for task in prange(tasks):
            buffer1, buffer2 = np.empty(block_size, np.float32), np.zeros(block_size, np.float32)
            index_buffer1, index_buffer2 = np.empty(block_size, np.uint8), np.empty(block_size, np.uint8)
            first, last = _task_blocks(task, (n + block_size - 1) // block_size)
            for block in range(first, last):
                start, end = _block_bounds(block, block_size, n)
                pb, gb = param[start:end], grad[start:end]
                s1, s2 = buffer1[:end - start], buffer2[:end - start]
                q1b = _block_indices(q1, start, end, per_byte1, index_buffer1)
                _dequantize_state_into(q1b, values1, a1, b1, rank1_1, block, start, s1)
                q2b = _block_indices(q2, start, end, per_byte2, index_buffer2) if two else index_buffer2[:0]
                if two:
                    _dequantize_state_into(q2b, values2, a2, b2, rank1_2, block, start, s2)
                for i in range(pb.size):
                    pb[i], s1[i], s2[i] = _update(kind, pb[i], gb[i], s1[i], s2[i], hyper)
                if rank1_1:
                    _quantize_rank1_into(s1, row_bits1, col_bits1, start, cols1, search1, q1b, s1)
                else:
                    a1[block] = _quantize_block(s1, s1.view(np.int32), q1b, search1, zero1)
                _store_block_indices(q1b, q1, start, end, per_byte1)
                if two:
                    if rank1_2:
                        _quantize_rank1_into(s2, row_bits2, col_bits2, start, cols2, search2, q2b, s2)
                    else:
                        a2[block] = _quantize_block(s2, s2.view(np.int32), q2b, search2, zero2)
                    _store_block_indices(q2b, q2, start, end, per_byte2)
        if rank1_1:
            a1[:] = row_bits1.view(np.float32)
            b1[:] = col_bits1.view(np.float32)
        if rank1_2:
            a2[:] = row_bits2.view(np.float32)
            b2[:] = col_bits2.view(np.float32)
    return step


def _check_state_arrays(state, n: int, block_size: int, what: str) -> tuple:
    """(per_byte, rank1) of one state (q, scale_a, scale_b, values, search, zero, per_byte) of n
    elements, its arrays' sizes checked: rank-1 (scale_b non-empty: rows * cols == n) or block-wise."""
    q, a, b, _, _, _, per_byte = state
    if per_byte not in (1, 2, 4) or block_size % per_byte:
        raise ValueError(f"{what}: per_byte must be 1, 2 or 4 and divide the block size {block_size}, got {per_byte}")
    rank1 = getattr(b, "size", 0) > 0
    _address(q, np.uint8, -(-n // per_byte), f"{what} indices")
    if rank1:
        _address(b, np.float32, b.size, f"{what} column maxima")
        _address(a, np.float32, n // b.size, f"{what} row maxima")
        if a.size * b.size != n:
            raise ValueError(f"{what}: {a.size} x {b.size} maxima do not fit {n} elements")
    else:
        _address(a, np.float32, -(-n // block_size), f"{what} absmax")
    return per_byte, rank1


def step_rank1(kind, n_states, param, grad, hyper, block_size, state1, state2):
    """One optimizer step in which some state has rank-1 normalisation, in place, on one parameter's
    NumPy arrays, in two passes (pass 1 computes the new maxima, pass 2 writes). Each state is
    (q, scale_a, scale_b, values, search, zero, per_byte): a rank-1 state has its row and column
    maxima as scale_a and scale_b; a block-wise one its absmax as scale_a and an empty scale_b.
    With one state, state2's arrays are not read (empty ones will do)."""
    n = getattr(param, "size", 0)
    _address(param, np.float32, n, "param")
    _address(grad, np.float32, n, "grad")
    per_byte1, rank1_1 = _check_state_arrays(state1, n, block_size, "state 1")
    per_byte2, rank1_2 = _check_state_arrays(state2, n, block_size, "state 2") if n_states == 2 else (1, False)
    if not (rank1_1 or rank1_2):
        raise ValueError("step_rank1 needs a rank-1 state; block-wise states alone take step_8bit")
    (q1, a1, b1, values1, search1, zero1, _), (q2, a2, b2, values2, search2, zero2, _) = state1, state2
    _step_rank1_kernel(int(kind), int(n_states), per_byte1, per_byte2, rank1_1, rank1_2)(
        param, grad, hyper, block_size, q1, a1, b1, values1, search1, zero1, q2, a2, b2, values2, search2, zero2,
        numba.get_num_threads())


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
def _lamb_norms_8bit(param, grad, m_q, m_absmax, m_values, v_q, v_absmax, v_values, hyper, block_size, partial,
                     m_per_byte, v_per_byte):
    for task in prange(_task_count(partial.shape[0])):
        m_buffer, v_buffer = np.empty(block_size, np.float32), np.empty(block_size, np.float32)
        m_indices, v_indices = np.empty(block_size, np.uint8), np.empty(block_size, np.uint8)
        first, last = _task_blocks(task, partial.shape[0])
        for block in range(first, last):
            start, end = _block_bounds(block, block_size, param.size)
            m, v = m_buffer[:end - start], v_buffer[:end - start]
            _dequantize_into(_block_indices(m_q, start, end, m_per_byte, m_indices), m_values, m_absmax[block], m)
            _dequantize_into(_block_indices(v_q, start, end, v_per_byte, v_indices), v_values, v_absmax[block], v)
            _squared_norms(param[start:end], grad[start:end], m, v, hyper, partial[block])


def lamb_norms_8bit(param, grad, m_q, m_absmax, m_values, v_q, v_absmax, v_values, hyper, block_size, partial,
                    per_byte=(1, 1)):
    """LAMB pass 1 (quantized states): as lamb_norms_32bit, from the dequantized states (indices
    packed ``per_byte`` a byte, as step_8bit's)."""
    _lamb_norms_8bit(param, grad, m_q, m_absmax, m_values, v_q, v_absmax, v_values, hyper, block_size, partial,
                     *_check_per_byte(per_byte, block_size))


@numba.njit(parallel=True, cache=True)
def lamb_apply_32bit(param, grad, m, v, hyper, neg_step):
    """LAMB pass 2 (float32 states): the same moments again, p += neg_step * r, store the moments."""
    for i in prange(param.size):
        param[i], m[i], v[i] = _lamb_apply(param[i], grad[i], m[i], v[i], hyper, neg_step)


@numba.njit(parallel=True, cache=True)
def _lamb_apply_8bit(param, grad, m_q, m_absmax, m_values, m_search, m_zero, v_q, v_absmax, v_values, v_search,
                     v_zero, hyper, block_size, neg_step, m_per_byte, v_per_byte):
    for task in prange(_task_count(m_absmax.size)):
        m_buffer, v_buffer = np.empty(block_size, np.float32), np.empty(block_size, np.float32)
        m_indices, v_indices = np.empty(block_size, np.uint8), np.empty(block_size, np.uint8)
        first, last = _task_blocks(task, m_absmax.size)
        for block in range(first, last):
            start, end = _block_bounds(block, block_size, param.size)
            pb, gb = param[start:end], grad[start:end]
            mqb = _block_indices(m_q, start, end, m_per_byte, m_indices)
            vqb = _block_indices(v_q, start, end, v_per_byte, v_indices)
            m, v = m_buffer[:end - start], v_buffer[:end - start]
            _dequantize_into(mqb, m_values, m_absmax[block], m)
            _dequantize_into(vqb, v_values, v_absmax[block], v)
            for i in range(pb.size):
                pb[i], m[i], v[i] = _lamb_apply(pb[i], gb[i], m[i], v[i], hyper, neg_step)
            m_absmax[block] = _quantize_block(m, m.view(np.int32), mqb, m_search, m_zero)
            v_absmax[block] = _quantize_block(v, v.view(np.int32), vqb, v_search, v_zero)
            _store_block_indices(mqb, m_q, start, end, m_per_byte)
            _store_block_indices(vqb, v_q, start, end, v_per_byte)


def lamb_apply_8bit(param, grad, m_q, m_absmax, m_values, m_search, m_zero, v_q, v_absmax, v_values, v_search,
                    v_zero, hyper, block_size, neg_step, per_byte=(1, 1)):
    """LAMB pass 2 (quantized states): dequantize, the same moments again, p += neg_step * r, requantize."""
    _lamb_apply_8bit(param, grad, m_q, m_absmax, m_values, m_search, m_zero, v_q, v_absmax, v_values, v_search,
                     v_zero, hyper, block_size, neg_step, *_check_per_byte(per_byte, block_size))


@numba.njit(parallel=True, cache=True)
def search_all(u, table, points, shift, bias, out):
    """The kernels' table search alone over many u in [-1, 1] into uint8 out (for the tests)."""
    chunk = 1 << 12
    for c in prange((u.size + chunk - 1) // chunk):
        start, end = _block_bounds(c, chunk, u.size)
        _quantize_into(u[start:end], np.float32(1), (table, points, shift, bias), out[start:end])  # u / 1 is u
