"""CUDA kernels: bit-identical to quantlab.reference.

Runs under Numba's CUDA simulator in the default suite (small sizes: the simulator runs each GPU
thread in Python) and on a real GPU with QUANTLAB_GPU_TESTS=1 (experiments/bench/gpu_check.sh), where
sizes are full and torch CUDA tensors are tested too.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantlab as ql
from helpers.kernels import SHIPPED_CODES, assert_matches_reference, block_sizes, float_arrays
from quantlab import kernels
from quantlab.kernels import cuda as cuda_kernels

SIMULATED = bool(numba.config.ENABLE_CUDASIM)
MAX_ELEMENTS = 48 if SIMULATED else 200_000
MAX_BLOCK = 300 if SIMULATED else 8192
EXAMPLES = 20 if SIMULATED else 200


@settings(max_examples=EXAMPLES, deadline=None)
@given(x=float_arrays(MAX_ELEMENTS), code=st.sampled_from(SHIPPED_CODES), block_size=block_sizes(MAX_BLOCK))
def test_nearest_matches_reference(x, code, block_size):
    assert_matches_reference(x, code, block_size, "cuda")


@settings(max_examples=EXAMPLES, deadline=None)
@given(x=float_arrays(MAX_ELEMENTS), code=st.sampled_from(SHIPPED_CODES), block_size=block_sizes(MAX_BLOCK),
       seed=st.integers(0, 2**32 - 1))
def test_stochastic_matches_reference(x, code, block_size, seed):
    noise = np.random.default_rng(seed).random(x.shape, dtype=np.float32)
    assert_matches_reference(x, code, block_size, "cuda", noise=noise)


def test_decision_points_and_neighbours():
    for code in [ql.dynamic_code(True), ql.dynamic_code(False), ql.fp8_code("e4m3")]:
        points = np.concatenate([code.midpoints, code.floor_points])
        u = np.concatenate([points, np.nextafter(points, np.float32(2)), np.nextafter(points, np.float32(-2)),
                            [1.0]]).astype(np.float32)
        u = u[np.abs(u) <= 1]
        assert_matches_reference(u, code, 256, "cuda")


def test_nonfinite_input_raises():
    x = np.ones(100, np.float32)
    x[70] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf .*block 1"):
        kernels.quantize_blockwise(x, ql.dynamic_code(), 64, backend="cuda")


def test_threads_per_block():
    assert [cuda_kernels.threads_for(b) for b in (1, 32, 33, 256, 4096)] == [32, 32, 64, 256, 256]


def test_block_bounds_beyond_int32():
    if SIMULATED:
        start, end = cuda_kernels.maths.block_bounds(2**25, 256, 2**40)
        assert (start, end) == (2**33, 2**33 + 256)
    else:
        pytest.skip("device functions are not callable from the host on a GPU; the CPU test covers the maths")


@pytest.mark.skipif(SIMULATED, reason="torch CUDA tensors need a GPU")
@pytest.mark.parametrize("n, block_size", [(2**24 + 17, 256), (2**24 + 5, 2048), (1000, 4096)])
def test_torch_cuda_tensors_full_size(n, block_size):
    import torch

    code = ql.dynamic_code()
    x = torch.randn(n, device="cuda")
    q, absmax = kernels.quantize_blockwise(x, code, block_size)
    assert q.is_cuda and absmax.is_cuda
    ref_q, ref_absmax = ql.quantize_blockwise(x.cpu().numpy(), code, block_size)
    np.testing.assert_array_equal(q.cpu().numpy(), ref_q)
    np.testing.assert_array_equal(absmax.cpu().numpy(), ref_absmax)
    values = kernels.dequantize_blockwise(q, absmax, code, block_size)
    np.testing.assert_array_equal(values.cpu().numpy(), ql.dequantize_blockwise(ref_q, ref_absmax, code, block_size))
    noise = torch.rand(n, device="cuda")
    q, _ = kernels.quantize_blockwise(x, code, block_size, noise=noise)
    np.testing.assert_array_equal(
        q.cpu().numpy(), ql.quantize_blockwise(x.cpu().numpy(), code, block_size, noise=noise.cpu().numpy())[0])


@pytest.mark.skipif(SIMULATED, reason="torch CUDA tensors need a GPU")
def test_runs_on_torch_current_stream():
    import torch

    code = ql.dynamic_code()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.randn(2**20, device="cuda")
        q, absmax = kernels.quantize_blockwise(x, code, 256, check_finite=False)
        values = kernels.dequantize_blockwise(q, absmax, code, 256)
    stream.synchronize()
    ref_q, ref_absmax = ql.quantize_blockwise(x.cpu().numpy(), code, 256)
    np.testing.assert_array_equal(q.cpu().numpy(), ref_q)
    np.testing.assert_array_equal(values.cpu().numpy(), ql.dequantize_blockwise(ref_q, ref_absmax, code, 256))
