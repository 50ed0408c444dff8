"""CUDA kernels (``numba.cuda.jit``): one thread block per quantization block.

The threads of a block stride over its elements (coalesced), reduce the absmax as an integer max
of the magnitude bits in shared memory, then each writes the indices of its elements. The per-
element maths is ``scalar.py``'s, the same as the CPU's. Under Numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1) the bit casts are NumPy views, on a GPU libdevice intrinsics.

Only IEEE operations that cannot be contracted into fused multiply-adds appear here (one
division, one multiplication, compares), so the GPU rounds exactly like the reference.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from .scalar import INF_BITS, MAGNITUDE_BITS, compile_scalar_maths

MAX_THREADS = 256

if numba.config.ENABLE_CUDASIM:
    def _float_bits(u):
        return np.float32(u).view(np.int32)

    def _float_of_bits(b):
        return np.int32(b).view(np.float32)
else:
    from numba.cuda import libdevice

    _float_bits, _float_of_bits = libdevice.float_as_int, libdevice.int_as_float

_device = cuda.jit(device=True)
maths = compile_scalar_maths(_device, _float_of_bits)
_block_bounds, _search = maths.block_bounds, maths.search
_round_up, _absmax_of_bits = maths.stochastic_round_up, maths.absmax_of_bits


def threads_for(block_size: int) -> int:
    """Threads per quantization block: a power of two from 32 to MAX_THREADS."""
    threads = 32
    while threads < min(block_size, MAX_THREADS):
        threads *= 2
    return threads


@_device
def _block_absmax(x_bits, start, end):
    """Shared-memory tree reduction of the block's largest magnitude bits; every thread gets it."""
    partial = cuda.shared.array(MAX_THREADS, np.int32)
    tid = cuda.threadIdx.x
    largest = 0
    i = start + tid
    while i < end:
        largest = max(largest, x_bits[i] & MAGNITUDE_BITS)
        i += cuda.blockDim.x
    partial[tid] = largest
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            partial[tid] = max(partial[tid], partial[tid + stride])
        cuda.syncthreads()
        stride //= 2
    largest = partial[0]
    cuda.syncthreads()  # partial is reused by the next call in this thread block
    return largest


@cuda.jit
def quantize_blockwise(x, x_bits, block_size, table, points, shift, bias, zero_index, q, absmax):
    block = cuda.blockIdx.x
    start, end = _block_bounds(block, block_size, x.size)
    largest = _block_absmax(x_bits, start, end)
    scale = _absmax_of_bits(largest)
    if cuda.threadIdx.x == 0:
        absmax[block] = scale
    finite_nonzero = largest != 0 and largest < INF_BITS
    i = start + cuda.threadIdx.x
    while i < end:
        if finite_nonzero:
            u = x[i] / scale
            q[i] = _search(u, _float_bits(u), table, points, shift, bias)
        else:
            q[i] = zero_index
        i += cuda.blockDim.x


@cuda.jit
def quantize_blockwise_stochastic(x, x_bits, noise, block_size, table, points, shift, bias,
                                  values, zero_index, q, absmax):
    block = cuda.blockIdx.x
    start, end = _block_bounds(block, block_size, x.size)
    largest = _block_absmax(x_bits, start, end)
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
        out[i] = values[q[i]] * scale
        i += cuda.blockDim.x
