"""CUDA kernels (``numba.cuda.jit``): one thread block per quantization block.

The threads of a block stride over its elements (coalesced), reduce the absmax as an integer max
of the magnitude bits in shared memory, then each writes the indices of its elements. The per-
element maths is ``scalar.py``'s, the same as the CPU's. Under Numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1) the bit casts are NumPy views and products NumPy's, on a GPU libdevice
intrinsics.

The GPU rounds exactly like the reference: every float32 product is libdevice's ``fmul_rn``, which
NVVM never contracts with an addition into a fused multiply-add (it contracts plain products by
default, fastmath or not); divisions and square roots are IEEE (NVVM's defaults prec-div=1,
prec-sqrt=1, ftz=0).

The fused optimizer steps (``step_32bit``, ``step_8bit``, ``step_rank1``, LAMB's ``lamb_norms_*`` and
``lamb_apply_*``), ``pack_indices``, ``unpack_indices`` and the rank-1 quantizers are host functions
with the names and arguments of cpu.py's kernels plus a ``stream=`` keyword. The 32-bit steps run a
thread per element. The quantized ones run a thread block per quantization block (block sizes up to
MAX_STEP_BLOCK), which keeps the block's new states in shared memory from the update to the
requantization; LAMB's norms sum each block's squares in element order, as the CPU does (LAMB's
pass 2 is the step kernels' kind _LAMB_APPLY).

Indices of 2- and 4-bit codes may be packed ``per_byte`` (4 or 2) a byte (reference.pack_indices).
Threads never share a byte they write: each owns groups of whole bytes (in the steps, of every
state: a block of a packed state starts on a byte, its block size being a multiple of per_byte).
Rank-1 maxima (reference.quantize_rank1) are raised with ``cuda.atomic.max`` on int32 magnitude
bits: non-negative floats order as their bits, and a maximum is the same in any order, so they are
the CPU's bit for bit.

Arrays they write (param, grad, states, q, absmax, maxima, partial) are flat device arrays: Numba's,
or anything with ``__cuda_array_interface__`` such as torch CUDA tensors (an empty host array may
stand for an unused state). Code values and search tables may be host arrays: read-only ones
(``Code.values``, ``SearchTable``) are copied to each device once. Hyperparameters are host arrays,
passed by value as kernel arguments.
"""
from __future__ import annotations

import weakref

import numba
import numpy as np
from numba import cuda
from numba.cuda.cudadrv.devicearray import is_cuda_ndarray

from .cpu import _check_per_byte
from .scalar import INF_BITS, MAGNITUDE_BITS, compile_scalar_maths

MAX_THREADS = 256
# The 8-bit step and LAMB norm kernels keep two float32 values per element of a block in dynamic
# shared memory (the new states, or LAMB's r and p): 32 KiB at this block size, within the 48 KiB
# a kernel gets without opting in, and small enough for several thread blocks per multiprocessor.
MAX_STEP_BLOCK = 4096
HYPER_SLOTS = 8  # hyperparameters travel as a float32 tuple padded to this length: one compiled kernel
_LAMB_APPLY = -1  # step-kernel kind of LAMB's pass 2: lamb_hyperparameters, then -lr * trust in slot 7

if numba.config.ENABLE_CUDASIM:
    def _float_bits(u):
        return np.float32(u).view(np.int32)

    def _float_of_bits(b):
        return np.int32(b).view(np.float32)

    def _mul(a, b):
        return a * b  # NumPy float32 scalars: one IEEE product

    def _device_id():
        return 0
else:
    from numba.cuda import libdevice

    _float_bits, _float_of_bits, _mul = libdevice.float_as_int, libdevice.int_as_float, libdevice.fmul_rn

    def _device_id():
        return cuda.get_current_device().id

_device = cuda.jit(device=True)
maths = compile_scalar_maths(_device, _float_of_bits, _mul)
_block_bounds, _search, _dequantize = maths.block_bounds, maths.search, maths.dequantize
_round_up, _absmax_of_bits = maths.stochastic_round_up, maths.absmax_of_bits
_lamb_moments, _lamb_direction, _lamb_apply, _optimizer_update = (maths.lamb_moments, maths.lamb_direction,
                                                                  maths.lamb_apply, maths.update)


def threads_for(block_size: int) -> int:
    """Threads per quantization block: a power of two from 32 to MAX_THREADS."""
    threads = 32
    while threads < min(block_size, MAX_THREADS):
        threads *= 2
    return threads


@_device
def _larger(a, b):
    return a if a > b else b  # not max(): see scalar.py


@_device
def _smaller(a, b):
    return a if a < b else b


@_device
def _thread_index():
    """The element (or byte) of a thread in a launch of a thread per element, as int64."""
    return np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x


@_device
def _block_max(largest):
    """Shared-memory tree reduction of the threads' ``largest`` (magnitude bits); every thread gets it."""
    partial = cuda.shared.array(MAX_THREADS, np.int32)
    tid = cuda.threadIdx.x
    partial[tid] = largest
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            partial[tid] = _larger(partial[tid], partial[tid + stride])
        cuda.syncthreads()
        stride //= 2
    largest = partial[0]
    cuda.syncthreads()  # partial is reused by the next call in this thread block
    return largest


@_device
def _magnitude_bits(x):
    return _float_bits(x) & MAGNITUDE_BITS


@_device
def _block_absmax_bits(x_bits, start, end):
    largest = 0
    i = start + cuda.threadIdx.x
    while i < end:
        largest = _larger(largest, x_bits[i] & MAGNITUDE_BITS)
        i += cuda.blockDim.x
    return _block_max(largest)


@_device
def _quantize(x, largest, table, points, shift, bias, zero_index):
    """Nearest index of x in a block whose largest magnitude bits are ``largest``; the index of
    zero in an all-zero or non-finite block."""
    if largest == 0 or largest >= INF_BITS:
        return np.uint8(zero_index)
    u = x / _absmax_of_bits(largest)
    return np.uint8(_search(u, _float_bits(u), table, points, shift, bias))


@cuda.jit
def quantize_blockwise(x, x_bits, block_size, table, points, shift, bias, zero_index, q, absmax):
    block = cuda.blockIdx.x
    start, end = _block_bounds(block, block_size, x.size)
    largest = _block_absmax_bits(x_bits, start, end)
    if cuda.threadIdx.x == 0:
        absmax[block] = _absmax_of_bits(largest)
    i = start + cuda.threadIdx.x
    while i < end:
        q[i] = _quantize(x[i], largest, table, points, shift, bias, zero_index)
        i += cuda.blockDim.x


@cuda.jit
def quantize_blockwise_stochastic(x, x_bits, noise, block_size, table, points, shift, bias,
                                  values, zero_index, q, absmax):
    block = cuda.blockIdx.x
    start, end = _block_bounds(block, block_size, x.size)
    largest = _block_absmax_bits(x_bits, start, end)
    scale = _absmax_of_bits(largest)
    if cuda.threadIdx.x == 0:
        absmax[block] = scale
    finite_nonzero = largest != 0 and largest < INF_BITS
    i = start + cuda.threadIdx.x
    while i < end:
        if finite_nonzero:
            u = x[i] / scale
            lower = _search(u, _float_bits(u), table, points, shift, bias)
            q[i] = lower + _round_up(u, noise[i], lower, values)
        else:
            q[i] = zero_index
        i += cuda.blockDim.x


@cuda.jit
def dequantize_blockwise(q, absmax, values, block_size, out):
    block = cuda.blockIdx.x
    start, end = _block_bounds(block, block_size, q.size)
    scale = absmax[block]
    i = start + cuda.threadIdx.x
    while i < end:
        out[i] = _dequantize(values, q[i], scale)
        i += cuda.blockDim.x


# --- packed indices, rank-1 scales ----------------------------------------------------------------

@_device
def _index_at(q, i, per_byte):
    """Index i of indices packed ``per_byte`` (1, 2 or 4) a byte, low bits first (reference.pack_indices)."""
    log2 = per_byte >> 1  # 1, 2, 4 -> 0, 1, 2: shifts and masks, not int64 divisions
    bits = 8 >> log2
    return (q[i >> log2] >> ((i & (per_byte - 1)) * bits)) & ((1 << bits) - 1)


@_device
def _pack_index(q, i, index, byte, per_byte, end):
    """Put element i's index into ``byte``, the byte being filled from its first index on, and store
    it once full or at the last element (end - 1; the unused high bits stay 0). Returns the byte to
    go on filling. Only the thread that owns a byte fills it."""
    log2 = per_byte >> 1
    byte |= np.int64(index) << ((i & (per_byte - 1)) * (8 >> log2))
    if (i + 1) & (per_byte - 1) == 0 or i + 1 == end:
        q[i >> log2] = byte
        return np.int64(0)
    return byte


@cuda.jit
def _pack(q, per_byte, packed):
    """A thread per byte of packed."""
    j = _thread_index()
    if j < packed.size:
        byte = np.int64(0)
        for i in range(j * per_byte, _smaller((j + 1) * per_byte, q.size)):
            byte = _pack_index(packed, i, q[i], byte, per_byte, q.size)


@cuda.jit
def _unpack(packed, per_byte, q):
    i = _thread_index()
    if i < q.size:
        q[i] = _index_at(packed, i, per_byte)


@_device
def _rank1_scale(row_max, col_max, i):
    """min(row max, column max) of element i of a (row_max.size, col_max.size) matrix."""
    cols = col_max.size
    return _smaller(row_max[i // cols], col_max[i % cols])


@_device
def _rank1_scale_bits(bits, rows, cols, i):
    """_rank1_scale from maxima as magnitude bits: rows of them, then cols (non-negative floats
    order as their bits)."""
    return _smaller(bits[i // cols], bits[rows + i % cols])


@_device
def _fold_rank1(bits, rows, cols, i, magnitude):
    """Raise element i's row and column maxima (see _rank1_scale_bits) to its magnitude bits. A plain
    read first skips most atomics: the maxima only grow, so a stale read is at worst smaller."""
    r, c = i // cols, rows + i % cols
    if magnitude > bits[r]:
        cuda.atomic.max(bits, r, magnitude)
    if magnitude > bits[c]:
        cuda.atomic.max(bits, c, magnitude)


@_device
def _state_at(q, scale_a, scale_b, values, per_byte, rank1, block, i):
    """Element i of a quantized state: block-wise (scale_a: the blocks' absmax) or rank-1 (scale_a,
    scale_b: the row and column maxima)."""
    scale = _rank1_scale(scale_a, scale_b, i) if rank1 else scale_a[block]
    return _dequantize(values, _index_at(q, i, per_byte), scale)


@cuda.jit
def _zero(a):
    i = _thread_index()
    if i < a.size:
        a[i] = 0


@cuda.jit
def _rank1_maxima(x_bits, rows, cols, bits):
    """Fold every element's magnitude into the zeroed maxima ``bits`` (see _rank1_scale_bits)."""
    i = _thread_index()
    if i < x_bits.size:
        _fold_rank1(bits, rows, cols, i, x_bits[i] & MAGNITUDE_BITS)


@cuda.jit
def _quantize_rank1(x, bits, rows, cols, table, points, shift, bias, zero_index, per_byte, q):
    """A thread per byte of q: the nearest index of each of its elements / min(row max, column max)."""
    j = _thread_index()
    if j < q.size:
        byte = np.int64(0)
        for i in range(j * per_byte, _smaller((j + 1) * per_byte, x.size)):
            index = _quantize(x[i], _rank1_scale_bits(bits, rows, cols, i), table, points, shift, bias, zero_index)
            byte = _pack_index(q, i, index, byte, per_byte, x.size)


@cuda.jit
def _dequantize_rank1(q, row_max, col_max, values, per_byte, out):
    i = _thread_index()
    if i < out.size:
        out[i] = _state_at(q, row_max, col_max, values, per_byte, True, 0, i)


@cuda.jit
def _store_maxima(bits, row_max, col_max):
    """The maxima as magnitude bits (rows, then columns) into the float32 row and column maxima."""
    k = _thread_index()
    if k < row_max.size:
        row_max[k] = _absmax_of_bits(bits[k])
    elif k < bits.size:
        col_max[k - row_max.size] = _absmax_of_bits(bits[k])


# --- fused optimizer steps ------------------------------------------------------------------------

@_device
def _update(kind, p, g, s1, s2, hyper):
    """scalar.update, plus LAMB's pass 2 as one more kind (its two passes share the step kernels)."""
    if kind == _LAMB_APPLY:
        return _lamb_apply(p, g, s1, s2, hyper, hyper[7])
    return _optimizer_update(kind, p, g, s1, s2, hyper)


@cuda.jit
def _step_32bit(kind, n_states, param, grad, s1, s2, hyper):
    """One thread per element; unused states are empty arrays."""
    i = _thread_index()
    if i < param.size:
        a = s1[i] if n_states >= 1 else np.float32(0)
        b = s2[i] if n_states == 2 else np.float32(0)
        param[i], a, b = _update(kind, param[i], grad[i], a, b, hyper)
        if n_states >= 1:
            s1[i] = a
        if n_states == 2:
            s2[i] = b


@_device
def _requantize(x, i, largest, bits, rows, cols, rank1, table, points, shift, bias, zero_index):
    """The index of a new state's element i: by its block's largest magnitude bits (block-wise) or
    by min(new row max, new column max) (rank-1, the maxima ``bits`` of pass 1)."""
    scale_bits = _rank1_scale_bits(bits, rows, cols, i) if rank1 else largest
    return _quantize(x, scale_bits, table, points, shift, bias, zero_index)


@cuda.jit
def _step_quantized(write, kind, n_states, param, grad, hyper, block_size,
                    q1, a1, b1, bits1, values1, table1, points1, shift1, bias1, zero1, per_byte1,
                    q2, a2, b2, bits2, values2, table2, points2, shift2, bias2, zero2, per_byte2):
    """One thread block per quantization block; each state is block-wise (a: absmax, b empty) or
    rank-1 (a, b: row and column maxima; ``bits``: its new maxima, zeroed before pass 1), its
    indices packed per_byte a byte. A thread owns groups of ``group`` consecutive elements, whole
    bytes of both states. Each thread dequantizes and updates its elements, then:

    * pass 1 (``write`` False, only with a rank-1 state) raises the new rank-1 maxima and writes
      nothing else;
    * pass 2 writes the parameter and keeps the new states in dynamic shared memory (state 1 at
      [0, block_size), state 2 after it); then the block absmax of each state; then each thread
      requantizes the elements it updated (its own shared entries: no barrier needed for them),
      block-wise states by their block absmax, rank-1 ones by the new maxima."""
    block = cuda.blockIdx.x
    start, end = _block_bounds(block, block_size, param.size)
    new = cuda.shared.array(0, numba.float32)
    two = n_states == 2
    rank1_1, rank1_2 = b1.size > 0, two and b2.size > 0
    group = _larger(per_byte1, per_byte2) if two else per_byte1
    step = np.int64(cuda.blockDim.x) * group
    largest1, largest2 = 0, 0
    first = start + cuda.threadIdx.x * group
    while first < end:
        for i in range(first, _smaller(first + group, end)):
            s2 = _state_at(q2, a2, b2, values2, per_byte2, rank1_2, block, i) if two else np.float32(0)
            p, s1, s2 = _update(kind, param[i], grad[i], _state_at(q1, a1, b1, values1, per_byte1, rank1_1, block, i),
                                s2, hyper)
            if write:
                param[i] = p
                new[i - start] = s1
                largest1 = _larger(largest1, _magnitude_bits(s1))
                if two:
                    new[block_size + i - start] = s2
                    largest2 = _larger(largest2, _magnitude_bits(s2))
            else:
                if rank1_1:
                    _fold_rank1(bits1, a1.size, b1.size, i, _magnitude_bits(s1))
                if rank1_2:
                    _fold_rank1(bits2, a2.size, b2.size, i, _magnitude_bits(s2))
        first += step
    if not write:
        return
    # Every thread has read a1/a2[block] before these barriers, so thread 0 may overwrite them.
    largest1, largest2 = _block_max(largest1), _block_max(largest2)
    if cuda.threadIdx.x == 0:
        if not rank1_1:
            a1[block] = _absmax_of_bits(largest1)
        if two and not rank1_2:
            a2[block] = _absmax_of_bits(largest2)
    first = start + cuda.threadIdx.x * group
    while first < end:
        byte1, byte2 = np.int64(0), np.int64(0)
        for i in range(first, _smaller(first + group, end)):
            index = _requantize(new[i - start], i, largest1, bits1, a1.size, b1.size, rank1_1, table1, points1,
                                shift1, bias1, zero1)
            byte1 = _pack_index(q1, i, index, byte1, per_byte1, end)
            if two:
                index = _requantize(new[block_size + i - start], i, largest2, bits2, a2.size, b2.size, rank1_2,
                                    table2, points2, shift2, bias2, zero2)
                byte2 = _pack_index(q2, i, index, byte2, per_byte2, end)
        first += step


@cuda.jit
def _lamb_norms(quantized, param, grad, m, v, m_q, m_absmax, m_values, m_per_byte, v_q, v_absmax, v_values,
                v_per_byte, hyper, block_size, partial):
    """partial[block] = (sum r**2, sum p**2) with float32 states (m, v) or quantized ones (the
    unused kind are empty arrays). The float64 sums run in element order, as on the CPU (float
    addition does not reassociate): r and p go to dynamic shared memory, then one thread sums each."""
    block = cuda.blockIdx.x
    start, end = _block_bounds(block, block_size, param.size)
    r_and_p = cuda.shared.array(0, numba.float32)
    i = start + cuda.threadIdx.x
    while i < end:
        if quantized:
            m_i = _dequantize(m_values, _index_at(m_q, i, m_per_byte), m_absmax[block])
            v_i = _dequantize(v_values, _index_at(v_q, i, v_per_byte), v_absmax[block])
        else:
            m_i, v_i = m[i], v[i]
        m_i, v_i = _lamb_moments(grad[i], m_i, v_i, hyper)
        r_and_p[i - start] = _lamb_direction(param[i], m_i, v_i, hyper)
        r_and_p[block_size + i - start] = param[i]
        i += cuda.blockDim.x
    cuda.syncthreads()
    for column in range(2):
        if cuda.threadIdx.x == column * (cuda.blockDim.x - 1):  # the first thread and the last
            total = 0.0
            for j in range(end - start):
                x = np.float64(r_and_p[column * block_size + j])
                total += x * x  # exact in float64, so a fused multiply-add rounds the same
            partial[block, column] = total


# --- host side ------------------------------------------------------------------------------------

def _launch(kernel, blocks, threads, stream, shared_bytes, *args):
    if blocks:  # CUDA rejects an empty grid
        kernel[blocks, threads, stream, shared_bytes](*args)


def _launch_per_element(kernel, n, stream, *args):
    """A launch of a thread per element (or byte) of n."""
    threads = threads_for(n)
    _launch(kernel, -(-n // threads), threads, stream, 0, *args)


def _device_array(a):
    """An array a kernel writes (or reads per element): a Numba device array, or one through
    ``__cuda_array_interface__`` (torch CUDA tensors); an empty host array for an unused state."""
    if is_cuda_ndarray(a):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        # No sync with the stream the array names: the kernels run on the caller's stream (torch's
        # current one), after the work that wrote the array; syncing would block the host each call.
        return cuda.as_cuda_array(a, sync=False)
    if np.size(a) == 0:
        return _empty(np.asarray(a).dtype)
    raise TypeError(f"expected a CUDA device array or tensor, got {type(a).__name__}")


def _empty(dtype):
    return cuda.device_array(0, dtype)


_copies = {}  # (id(host array), pad_to, device) -> (weak reference to the host array, device copy)


def constant_on_device(a, stream, pad_to: int = 0):
    """A kernel input that stays constant (code values, search tables) on the device. A host array
    is copied, once per device if NumPy marks it read-only (then the copy lives as long as the host
    array). ``pad_to``: pad a host array with NaN to this many entries (code values: an index past
    the code, not checked on the GPU as that would cost a device-to-host read, reads NaN rather than
    foreign memory)."""
    if is_cuda_ndarray(a) or hasattr(a, "__cuda_array_interface__"):
        return _device_array(a)
    a = np.asarray(a)
    key = (id(a), pad_to, _device_id())
    cached = _copies.get(key)
    if cached is not None and cached[0]() is a:
        return cached[1]
    host = a
    if a.size < pad_to:
        host = np.full(pad_to, np.nan, a.dtype)
        host[: a.size] = a
    copy = cuda.to_device(host, stream=stream)  # ordered before the kernel on the same stream
    if not a.flags.writeable:
        cuda.synchronize()  # a kept copy is complete before kernels on any stream read it
        _copies[key] = (weakref.ref(a, lambda _, key=key: _copies.pop(key, None)), copy)
    return copy


def _by_value(hyper, *extra) -> tuple:
    """hyper (and extra values) as a float32 tuple of HYPER_SLOTS entries, zero-padded."""
    values = np.concatenate([np.asarray(hyper, np.float32).reshape(-1), np.asarray(extra, np.float32)])
    if values.size > HYPER_SLOTS:
        raise ValueError(f"at most {HYPER_SLOTS} hyperparameters, got {values.size}")
    return tuple(np.pad(values, (0, HYPER_SLOTS - values.size)))


def _check_step_block(block_size):
    if not 1 <= block_size <= MAX_STEP_BLOCK:
        raise ValueError(f"the CUDA step kernels take block sizes from 1 to {MAX_STEP_BLOCK}, got {block_size}")


def _zeroed_maxima(rows, cols, stream):
    """int32 magnitude bits of rows then cols maxima, zeroed, for the kernels to raise."""
    bits = cuda.device_array(rows + cols, np.int32, stream=stream)
    _launch_per_element(_zero, bits.size, stream, bits)
    return bits


def _step_state(stream, n, block_size, q, scale_a, scale_b, values, search, zero, per_byte, what) -> tuple:
    """One quantized state (cpu.step_rank1's layout, scale_b empty for a block-wise state) as the
    step kernel's arguments: q, scale_a, scale_b, new maxima bits (empty for a block-wise state),
    values, table, points, shift, bias, zero index, per_byte."""
    q, scale_a, scale_b = _device_array(q), _device_array(scale_a), _device_array(scale_b)
    rank1 = scale_b.size > 0
    if (scale_a.size * scale_b.size if rank1 else scale_a.size) != (n if rank1 else -(-n // block_size)):
        raise ValueError(f"{what}: {scale_a.size} (x {scale_b.size}) scales do not fit {n} elements in blocks of "
                         f"{block_size}")
    if q.size != -(-n // per_byte):
        raise ValueError(f"{what}: {n} indices {per_byte} a byte take {-(-n // per_byte)} bytes, got {q.size}")
    bits = _zeroed_maxima(scale_a.size, scale_b.size, stream) if rank1 else _empty(np.int32)
    table, points, shift, bias = search
    return (q, scale_a, scale_b, bits, constant_on_device(values, stream, pad_to=256),
            constant_on_device(table, stream), constant_on_device(points, stream), shift, bias, zero, per_byte)


def _launch_step_32bit(kind, n_states, param, grad, s1, s2, hyper, stream):
    param = _device_array(param)
    _launch_per_element(_step_32bit, param.size, stream, kind, n_states, param, _device_array(grad),
                        _device_array(s1), _device_array(s2), hyper)


def _launch_step(kind, n_states, param, grad, hyper, block_size, state1, state2, stream, need_rank1=False):
    """The quantized step kernel's passes on states in cpu.step_rank1's layout (q, scale_a, scale_b,
    values, search, zero, per_byte): pass 1 if a state is rank-1, pass 2, then the new maxima stored."""
    _check_step_block(block_size)
    per_byte = _check_per_byte((state1[-1], state2[-1] if n_states == 2 else 1), block_size)
    param = _device_array(param)
    n = param.size
    first = _step_state(stream, n, block_size, *state1[:-1], per_byte[0], "state 1")
    if n_states == 2:
        second = _step_state(stream, n, block_size, *state2[:-1], per_byte[1], "state 2")
    else:  # never read: empty arrays, state 1's code
        second = (_empty(np.uint8), _empty(np.float32), _empty(np.float32), _empty(np.int32), *first[4:10], 1)
    rank1 = [state for state in (first, second) if state[2].size]
    if need_rank1 and not rank1:
        raise ValueError("step_rank1 needs a rank-1 state; block-wise states alone take step_8bit")
    group = max(per_byte[:n_states])
    blocks, threads = -(-n // block_size), threads_for(-(-block_size // group))
    args = (kind, n_states, param, _device_array(grad), hyper, block_size, *first, *second)
    if rank1:
        _launch(_step_quantized, blocks, threads, stream, 0, False, *args)
    _launch(_step_quantized, blocks, threads, stream, 4 * n_states * block_size, True, *args)
    for _, row_max, col_max, bits, *_ in rank1:
        _launch_per_element(_store_maxima, bits.size, stream, bits, row_max, col_max)


def _launch_lamb_norms(quantized, param, grad, m, v, m_state, v_state, hyper, block_size, partial, stream):
    _check_step_block(block_size)
    partial = _device_array(partial)
    _launch(_lamb_norms, partial.shape[0], threads_for(block_size), stream, 8 * block_size, quantized,
            _device_array(param), _device_array(grad), _device_array(m), _device_array(v), *m_state, *v_state,
            _by_value(hyper), block_size, partial)


def pack_indices(q, per_byte, packed, stream=0):
    """reference.pack_indices: q (uint8[n]) into packed (uint8[ceil(n / per_byte)]), per_byte 1, 2 or 4."""
    packed = _device_array(packed)
    _launch_per_element(_pack, packed.size, stream, _device_array(q), per_byte, packed)


def unpack_indices(packed, per_byte, q, stream=0):
    """reference.unpack_indices: packed into q (uint8[n])."""
    q = _device_array(q)
    _launch_per_element(_unpack, q.size, stream, _device_array(packed), per_byte, q)


def _check_rank1(n, rows, cols, per_byte, q_size):
    if rows * cols != n or n == 0 or per_byte not in (1, 2, 4) or q_size != -(-n // per_byte):
        raise ValueError(f"{n} elements are not a {rows} x {cols} matrix of {q_size} bytes of indices {per_byte} a "
                         f"byte (per_byte: 1, 2 or 4)")


def quantize_rank1(x, x_bits, search_table, zero_index, per_byte, q, row_max, col_max, stream=0):
    """cpu.quantize_rank1 on the GPU: x (float32[n], x_bits: its int32 view) as a (row_max.size,
    col_max.size) matrix into q (packed per_byte a byte) and the maxima."""
    x, q, row_max, col_max = (_device_array(a) for a in (x, q, row_max, col_max))
    rows, cols = row_max.size, col_max.size
    _check_rank1(x.size, rows, cols, per_byte, q.size)
    bits = _zeroed_maxima(rows, cols, stream)
    _launch_per_element(_rank1_maxima, x.size, stream, _device_array(x_bits), rows, cols, bits)
    table, points, shift, bias = search_table
    _launch_per_element(_quantize_rank1, q.size, stream, x, bits, rows, cols, constant_on_device(table, stream),
                        constant_on_device(points, stream), shift, bias, zero_index, per_byte, q)
    _launch_per_element(_store_maxima, bits.size, stream, bits, row_max, col_max)


def dequantize_rank1(q, row_max, col_max, values, per_byte, out, stream=0):
    """cpu.dequantize_rank1 on the GPU: out (float32[rows * cols]) from q packed per_byte a byte."""
    q, row_max, col_max, out = (_device_array(a) for a in (q, row_max, col_max, out))
    _check_rank1(out.size, row_max.size, col_max.size, per_byte, q.size)
    _launch_per_element(_dequantize_rank1, out.size, stream, q, row_max, col_max,
                        constant_on_device(values, stream, pad_to=256), per_byte, out)


def step_32bit(kind, n_states, param, grad, s1, s2, hyper, stream=0):
    """cpu.step_32bit on the GPU: one step with float32 states (0, 1 or 2 of them), in place."""
    _launch_step_32bit(kind, n_states, param, grad, s1, s2, _by_value(hyper), stream)


def step_8bit(kind, n_states, param, grad, hyper, block_size, q1, absmax1, values1, search1, zero1,
              q2, absmax2, values2, search2, zero2, per_byte=(1, 1), stream=0):
    """cpu.step_8bit on the GPU: one step with 1 or 2 block-wise quantized states, in place (block_size
    up to MAX_STEP_BLOCK), indices packed per_byte a byte. With one state, q2/absmax2 are not
    touched (they may be empty)."""
    unused = np.zeros(0, np.float32)
    _launch_step(kind, n_states, param, grad, _by_value(hyper), block_size,
                 (q1, absmax1, unused, values1, search1, zero1, per_byte[0]),
                 (q2, absmax2, unused, values2, search2, zero2, per_byte[1]), stream)


def step_rank1(kind, n_states, param, grad, hyper, block_size, state1, state2, stream=0):
    """cpu.step_rank1 on the GPU: one step in which some state has rank-1 normalisation, in place.
    Each state is (q, scale_a, scale_b, values, search, zero, per_byte): rank-1 with its row and
    column maxima, or block-wise with its absmax and an empty scale_b. With one state, state2 is
    not read."""
    _launch_step(kind, n_states, param, grad, _by_value(hyper), block_size, state1, state2, stream, need_rank1=True)


def lamb_norms_32bit(param, grad, m, v, hyper, block_size, partial, stream=0):
    """LAMB pass 1 (float32 states): partial[block] = (sum r**2, sum p**2) in float64; writes nothing else."""
    unused = tuple(_empty(dtype) for dtype in (np.uint8, np.float32, np.float32)) + (1,)
    _launch_lamb_norms(False, param, grad, m, v, unused, unused, hyper, block_size, partial, stream)


def lamb_norms_8bit(param, grad, m_q, m_absmax, m_values, v_q, v_absmax, v_values, hyper, block_size, partial,
                    per_byte=(1, 1), stream=0):
    """LAMB pass 1 (quantized states, indices packed per_byte a byte): as lamb_norms_32bit, from the
    dequantized states."""
    m_per_byte, v_per_byte = _check_per_byte(per_byte, block_size)
    unused = np.zeros(0, np.float32)
    m_state = (_device_array(m_q), _device_array(m_absmax), constant_on_device(m_values, stream, pad_to=256),
               m_per_byte)
    v_state = (_device_array(v_q), _device_array(v_absmax), constant_on_device(v_values, stream, pad_to=256),
               v_per_byte)
    _launch_lamb_norms(True, param, grad, unused, unused, m_state, v_state, hyper, block_size, partial, stream)


def lamb_apply_32bit(param, grad, m, v, hyper, neg_step, stream=0):
    """LAMB pass 2 (float32 states): the same moments again, p += neg_step * r, store the moments."""
    _launch_step_32bit(_LAMB_APPLY, 2, param, grad, m, v, _by_value(hyper, neg_step), stream)


def lamb_apply_8bit(param, grad, m_q, m_absmax, m_values, m_search, m_zero, v_q, v_absmax, v_values, v_search,
                    v_zero, hyper, block_size, neg_step, per_byte=(1, 1), stream=0):
    """LAMB pass 2 (quantized states): dequantize, the same moments again, p += neg_step * r, requantize."""
    unused = np.zeros(0, np.float32)
    _launch_step(_LAMB_APPLY, 2, param, grad, _by_value(hyper, neg_step), block_size,
                 (m_q, m_absmax, unused, m_values, m_search, m_zero, per_byte[0]),
                 (v_q, v_absmax, unused, v_values, v_search, v_zero, per_byte[1]), stream)
