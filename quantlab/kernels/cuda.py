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

The fused optimizer steps (``step_32bit``, ``step_8bit``, LAMB's ``lamb_norms_*`` and
``lamb_apply_*``) are host functions with the names and arguments of cpu.py's kernels plus a
``stream=`` keyword. The 32-bit ones run a thread per element. The 8-bit ones run a thread block per
quantization block (block sizes up to MAX_STEP_BLOCK), which keeps the block's new states in shared
memory from the update to the requantization; LAMB's norms sum each block's squares in element
order, as the CPU does (LAMB's pass 2 is the step kernels' kind _LAMB_APPLY). Arrays they write
(param, grad, states, q, absmax, partial) are flat device arrays: Numba's, or anything with
``__cuda_array_interface__`` such as torch CUDA tensors (an empty host array may stand for an unused
state). Code values and search tables may be host arrays: read-only ones (``Code.values``,
``SearchTable``) are copied to each device once. Hyperparameters
are host arrays, passed by value as kernel arguments.
"""
from __future__ import annotations

import weakref

import numba
import numpy as np
from numba import cuda
from numba.cuda.cudadrv.devicearray import is_cuda_ndarray

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
    start, end = _block_bounds(cuda.blockIdx.x, cuda.blockDim.x, param.size)
    i = start + cuda.threadIdx.x
    if i < end:
        a = s1[i] if n_states >= 1 else np.float32(0)
        b = s2[i] if n_states == 2 else np.float32(0)
        param[i], a, b = _update(kind, param[i], grad[i], a, b, hyper)
        if n_states >= 1:
            s1[i] = a
        if n_states == 2:
            s2[i] = b


@cuda.jit
def _step_8bit(kind, n_states, param, grad, hyper, block_size, q1, absmax1, values1, table1, points1, shift1,
               bias1, zero1, q2, absmax2, values2, table2, points2, shift2, bias2, zero2):
    """One thread block per quantization block. Each thread dequantizes and updates its elements,
    writing the parameter and keeping the new states in dynamic shared memory (state 1 at
    [0, block_size), state 2 after it); then the block absmax of each state; then each thread
    requantizes the elements it updated (its own shared entries: no barrier needed for them)."""
    block = cuda.blockIdx.x
    start, end = _block_bounds(block, block_size, param.size)
    new = cuda.shared.array(0, numba.float32)
    two = n_states == 2
    scale1 = absmax1[block]
    scale2 = absmax2[block] if two else np.float32(0)
    largest1, largest2 = 0, 0
    i = start + cuda.threadIdx.x
    while i < end:
        s2 = _dequantize(values2, q2[i], scale2) if two else np.float32(0)
        param[i], s1, s2 = _update(kind, param[i], grad[i], _dequantize(values1, q1[i], scale1), s2, hyper)
        new[i - start] = s1
        largest1 = _larger(largest1, _magnitude_bits(s1))
        if two:
            new[block_size + i - start] = s2
            largest2 = _larger(largest2, _magnitude_bits(s2))
        i += cuda.blockDim.x
    # Every thread has read absmax1/2[block] before these barriers, so thread 0 may overwrite them.
    largest1, largest2 = _block_max(largest1), _block_max(largest2)
    if cuda.threadIdx.x == 0:
        absmax1[block] = _absmax_of_bits(largest1)
        if two:
            absmax2[block] = _absmax_of_bits(largest2)
    i = start + cuda.threadIdx.x
    while i < end:
        q1[i] = _quantize(new[i - start], largest1, table1, points1, shift1, bias1, zero1)
        if two:
            q2[i] = _quantize(new[block_size + i - start], largest2, table2, points2, shift2, bias2, zero2)
        i += cuda.blockDim.x


@cuda.jit
def _lamb_norms(quantized, param, grad, m, v, m_q, m_absmax, m_values, v_q, v_absmax, v_values, hyper,
                block_size, partial):
    """partial[block] = (sum r**2, sum p**2) with float32 states (m, v) or 8-bit ones (the unused
    kind are empty arrays). The float64 sums run in element order, as on the CPU (float addition
    does not reassociate): r and p go to dynamic shared memory, then one thread sums each."""
    block = cuda.blockIdx.x
    start, end = _block_bounds(block, block_size, param.size)
    r_and_p = cuda.shared.array(0, numba.float32)
    i = start + cuda.threadIdx.x
    while i < end:
        if quantized:
            m_i = _dequantize(m_values, m_q[i], m_absmax[block])
            v_i = _dequantize(v_values, v_q[i], v_absmax[block])
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
        return cuda.device_array(0, np.asarray(a).dtype)
    raise TypeError(f"expected a CUDA device array or tensor, got {type(a).__name__}")


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


def _quantized_state(stream, q, absmax, values, search=None, zero=0) -> tuple:
    """One 8-bit state as kernel arguments: q, absmax, values[, table, points, shift, bias, zero index]."""
    state = (_device_array(q), _device_array(absmax), constant_on_device(values, stream, pad_to=256))
    if search is None:
        return state
    table, points, shift, bias = search
    return (*state, constant_on_device(table, stream), constant_on_device(points, stream), shift, bias, zero)


def _launch_step_32bit(kind, n_states, param, grad, s1, s2, hyper, stream):
    param = _device_array(param)
    _launch(_step_32bit, -(-param.size // MAX_THREADS), MAX_THREADS, stream, 0,
            kind, n_states, param, _device_array(grad), _device_array(s1), _device_array(s2), hyper)


def _launch_step_8bit(kind, n_states, param, grad, hyper, block_size, state1, state2, stream):
    _check_step_block(block_size)
    state1, state2 = _quantized_state(stream, *state1), _quantized_state(stream, *state2)
    _launch(_step_8bit, state1[1].size, threads_for(block_size), stream, 4 * n_states * block_size,
            kind, n_states, _device_array(param), _device_array(grad), hyper, block_size, *state1, *state2)


def _launch_lamb_norms(quantized, param, grad, m, v, m_8bit, v_8bit, hyper, block_size, partial, stream):
    _check_step_block(block_size)
    partial = _device_array(partial)
    _launch(_lamb_norms, partial.shape[0], threads_for(block_size), stream, 8 * block_size, quantized,
            _device_array(param), _device_array(grad), _device_array(m), _device_array(v), *m_8bit, *v_8bit,
            _by_value(hyper), block_size, partial)


def step_32bit(kind, n_states, param, grad, s1, s2, hyper, stream=0):
    """cpu.step_32bit on the GPU: one step with float32 states (0, 1 or 2 of them), in place."""
    _launch_step_32bit(kind, n_states, param, grad, s1, s2, _by_value(hyper), stream)


def step_8bit(kind, n_states, param, grad, hyper, block_size, q1, absmax1, values1, search1, zero1,
              q2, absmax2, values2, search2, zero2, stream=0):
    """cpu.step_8bit on the GPU: one step with 1 or 2 block-wise 8-bit states, in place (block_size
    up to MAX_STEP_BLOCK). With one state, q2/absmax2 are not touched (they may be empty)."""
    _launch_step_8bit(kind, n_states, param, grad, _by_value(hyper), block_size,
                      (q1, absmax1, values1, search1, zero1), (q2, absmax2, values2, search2, zero2), stream)


def lamb_norms_32bit(param, grad, m, v, hyper, block_size, partial, stream=0):
    """LAMB pass 1 (float32 states): partial[block] = (sum r**2, sum p**2) in float64; writes nothing else."""
    unused = tuple(_device_array(np.zeros(0, dtype)) for dtype in (np.uint8, np.float32, np.float32))
    _launch_lamb_norms(False, param, grad, m, v, unused, unused, hyper, block_size, partial, stream)


def lamb_norms_8bit(param, grad, m_q, m_absmax, m_values, v_q, v_absmax, v_values, hyper, block_size, partial,
                    stream=0):
    """LAMB pass 1 (8-bit states): as lamb_norms_32bit, from the dequantized states."""
    unused = np.zeros(0, np.float32)
    _launch_lamb_norms(True, param, grad, unused, unused, _quantized_state(stream, m_q, m_absmax, m_values),
                       _quantized_state(stream, v_q, v_absmax, v_values), hyper, block_size, partial, stream)


def lamb_apply_32bit(param, grad, m, v, hyper, neg_step, stream=0):
    """LAMB pass 2 (float32 states): the same moments again, p += neg_step * r, store the moments."""
    _launch_step_32bit(_LAMB_APPLY, 2, param, grad, m, v, _by_value(hyper, neg_step), stream)


def lamb_apply_8bit(param, grad, m_q, m_absmax, m_values, m_search, m_zero, v_q, v_absmax, v_values, v_search,
                    v_zero, hyper, block_size, neg_step, stream=0):
    """LAMB pass 2 (8-bit states): dequantize, the same moments again, p += neg_step * r, requantize."""
    _launch_step_8bit(_LAMB_APPLY, 2, param, grad, _by_value(hyper, neg_step), block_size,
                      (m_q, m_absmax, m_values, m_search, m_zero), (v_q, v_absmax, v_values, v_search, v_zero),
                      stream)
