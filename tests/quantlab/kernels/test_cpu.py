"""CPU kernels: bit-identical to quantlab.reference, exact table search, safe indexing, clear errors."""
from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantlab as ql
from helpers.kernels import SHIPPED_CODES, assert_matches_reference, block_sizes, float_arrays
from quantlab import kernels
from quantlab.kernels import cpu
from quantlab.kernels.lookup import search_tables

EXAMPLES = 300


@settings(max_examples=EXAMPLES, deadline=None)
@given(x=float_arrays(3000), code=st.sampled_from(SHIPPED_CODES), block_size=block_sizes(5000))
def test_nearest_matches_reference(x, code, block_size):
    assert_matches_reference(x, code, block_size, "cpu")


@settings(max_examples=EXAMPLES, deadline=None)
@given(x=float_arrays(3000), code=st.sampled_from(SHIPPED_CODES), block_size=block_sizes(5000),
       seed=st.integers(0, 2**32 - 1))
def test_stochastic_matches_reference(x, code, block_size, seed):
    noise = np.random.default_rng(seed).random(x.shape, dtype=np.float32)
    assert_matches_reference(x, code, block_size, "cpu", noise=noise)


@settings(max_examples=50, deadline=None)
@given(x=float_arrays(2000), code=st.sampled_from(SHIPPED_CODES), block_size=block_sizes(3000),
       dtype=st.sampled_from([np.float16, np.float64]))
def test_other_dtypes_follow_reference_policy(x, code, block_size, dtype):
    with np.errstate(over="ignore"):
        wide = x.astype(dtype)
    if not np.all(np.isfinite(wide.astype(np.float32))):
        return  # float16 overflow: the error path is tested separately
    assert_matches_reference(wide, code, block_size, "cpu")


def test_midpoint_ties_and_neighbours():
    """Inputs exactly on, and one ulp either side of, every decision point (scaled by a block max of 1)."""
    for code in SHIPPED_CODES:
        points = np.concatenate([code.midpoints, code.floor_points])
        u = np.concatenate([points, np.nextafter(points, np.float32(2)), np.nextafter(points, np.float32(-2)),
                            code.values, [1.0]]).astype(np.float32)
        u = u[np.abs(u) <= 1]
        for noise in (None, np.random.default_rng(0).random(u.shape, dtype=np.float32)):
            assert_matches_reference(u, code, u.size, "cpu", noise=noise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_torch_cpu_tensors(dtype):
    code = ql.dynamic_code()
    x = torch.randn(33, 70, dtype=dtype)
    q, absmax = kernels.quantize_blockwise(x, code, 256)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.uint8 and q.shape == x.shape
    ref_q, ref_absmax = ql.quantize_blockwise(x.float().numpy(), code, 256)
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_array_equal(absmax.numpy(), ref_absmax)
    values = kernels.dequantize_blockwise(q, absmax, code, 256)
    assert isinstance(values, torch.Tensor) and values.dtype == torch.float32
    np.testing.assert_array_equal(values.numpy(), ql.dequantize_blockwise(ref_q, ref_absmax, code, 256))


def test_torch_input_is_not_copied_when_float32_contiguous(monkeypatch):
    """Zero-copy: the CPU kernel reads the tensor's own memory."""
    x = torch.randn(1000)
    seen = {}
    original = cpu.quantize_blockwise

    def spy(x_arr, *args):
        seen["pointer"] = x_arr.ctypes.data
        return original(x_arr, *args)

    monkeypatch.setattr(cpu, "quantize_blockwise", spy)
    kernels.quantize_blockwise(x, ql.dynamic_code(), 256)
    assert seen["pointer"] == x.data_ptr()


def _count_search_mismatches_source():
    @numba.njit(parallel=True)
    def mismatches(first_bits, last_bits, table, points, shift, bias, true_points):
        """Table search vs binary search for every float32 whose bit pattern is in [first, last]."""
        count = 0
        for pattern in numba.prange(first_bits, last_bits + 1):
            u = np.uint32(pattern).view(np.float32)
            found = cpu._search(u, np.uint32(pattern).view(np.int32), table, points, shift, bias)
            if found != np.searchsorted(true_points, u, side="left"):
                count += 1
        return count
    return mismatches


_mismatches = _count_search_mismatches_source()
POSITIVE_RANGE = (0x00000000, 0x3F800000)  # +0.0 .. 1.0
NEGATIVE_RANGE = (0x80000000, 0xBF800000)  # -0.0 .. -1.0


def _exhaustive(code):
    nearest, floor = search_tables(code)
    for table, true_points in ((nearest, code.midpoints), (floor, code.floor_points)):
        for first, last in (POSITIVE_RANGE, NEGATIVE_RANGE):
            assert _mismatches(first, last, table.table, table.points, table.shift, table.bias,
                               true_points) == 0, code


@pytest.mark.slow
@pytest.mark.parametrize("code", SHIPPED_CODES, ids=str)
def test_table_search_exact_for_every_float32_in_range(code):
    """All 2**31 + 2 float32 values in [-1, 1], both searches (nearest and floor); ~30 s a code."""
    _exhaustive(code)


def test_table_search_exact_around_every_decision_point():
    """The default tier's share of the exhaustive check: a table search can only go wrong where a
    table bucket holds a decision point, so check the 64 float32 values on either side of each one."""
    steps = np.arange(-64, 65, dtype=np.int64)
    for code in SHIPPED_CODES:
        for table, true_points in zip(search_tables(code), (code.midpoints, code.floor_points)):
            patterns = true_points.astype(np.float32).view(np.int32).astype(np.int64)
            near = np.unique((patterns[:, None] + steps).ravel())  # neighbours in bit-pattern order
            u = near[(near >= np.iinfo(np.int32).min) & (near <= np.iinfo(np.int32).max)].astype(np.int32)
            u = u.view(np.float32)
            u = u[np.isfinite(u) & (np.abs(u) <= 1)]
            out = np.empty(u.size, np.uint8)
            cpu.search_all(u, table.table, table.points, table.shift, table.bias, out)
            np.testing.assert_array_equal(out, np.searchsorted(true_points, u, side="left"), err_msg=str(code))


def test_table_search_sampled_for_every_code():
    u = np.random.default_rng(0).uniform(-1, 1, 200_000).astype(np.float32)
    u = np.concatenate([u, u * np.float32(1e-20), np.float32([0.0, -0.0, 1.0, -1.0])])
    for code in SHIPPED_CODES:
        for table, true_points in zip(search_tables(code), (code.midpoints, code.floor_points)):
            out = np.empty(u.size, np.uint8)
            cpu.search_all(u, table.table, table.points, table.shift, table.bias, out)
            np.testing.assert_array_equal(out, np.searchsorted(true_points, u, side="left"))
            np.testing.assert_array_equal(table.index(u), out)


def test_block_bounds_beyond_int32():
    """Block offsets past 2**31 and 2**32 elements, computed without allocating them."""
    for block, block_size, n in [(2**25, 256, 2**40), (2**20 + 3, 4096, 2**33 + 5), (2**31, 2, 2**32 + 1)]:
        start, end = cpu.maths.block_bounds(block, block_size, n)
        assert start == block * block_size
        assert end == min(start + block_size, n)
    assert ql.reference.num_blocks(2**33 + 1, 256) == 2**25 + 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_raises_naming_the_block(bad):
    x = np.ones(1000, np.float32)
    x[700] = bad
    before = x.copy()
    with pytest.raises(ValueError, match=r"NaN or Inf .*block 2"):
        kernels.quantize_blockwise(x, ql.dynamic_code(), 256)
    np.testing.assert_array_equal(x, before)
    with pytest.raises(ValueError, match="NaN or Inf"):
        kernels.quantize_blockwise(torch.from_numpy(x), ql.dynamic_code(), 256)


def test_float64_overflowing_float32_raises():
    with pytest.raises(ValueError, match="NaN or Inf"):
        kernels.quantize_blockwise(np.array([1.0, 1e300]), ql.dynamic_code(), 256)


@pytest.mark.parametrize("call, error, message", [
    (lambda: kernels.quantize_blockwise(np.zeros(0, np.float32), ql.dynamic_code(), 256), ValueError, "empty"),
    (lambda: kernels.quantize_blockwise(np.arange(10), ql.dynamic_code(), 256), TypeError, "int64"),
    (lambda: kernels.quantize_blockwise(torch.arange(10), ql.dynamic_code(), 256), TypeError, "int64"),
    (lambda: kernels.quantize_blockwise(np.ones(10, np.float32), ql.dynamic_code(), 0), ValueError, "block_size"),
    (lambda: kernels.quantize_blockwise(np.ones(10, np.float32), "dynamic", 4), TypeError, "Code"),
    (lambda: kernels.quantize_blockwise(np.ones(10, np.float32), ql.dynamic_code(), 4, noise=np.ones(3, np.float32)),
     ValueError, "shape"),
    (lambda: kernels.quantize_blockwise(np.ones(10, np.float32), ql.dynamic_code(), 4, backend="tpu"),
     ValueError, "backend"),
    (lambda: kernels.dequantize_blockwise(np.zeros(10, np.uint8), np.ones(2, np.float32), ql.dynamic_code(), 4),
     ValueError, "absmax has 2 entries"),
    (lambda: kernels.dequantize_blockwise(np.full(10, 255, np.uint8), np.ones(3, np.float32),
                                          ql.dynamic_code(True, 8, symmetric=True), 4), ValueError, "index 255"),
    (lambda: kernels.dequantize_blockwise(np.zeros(10, np.int32), np.ones(3, np.float32), ql.dynamic_code(), 4),
     TypeError, "uint8"),
    (lambda: kernels.dequantize_blockwise(np.zeros(10, np.uint8), np.full(3, np.nan, np.float32),
                                          ql.dynamic_code(), 4), ValueError, "finite"),
])
def test_bad_input_raises_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_backend_environment_variable(monkeypatch):
    x = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    monkeypatch.setenv("QUANTLAB_BACKEND", "reference")
    q, absmax = kernels.quantize_blockwise(x, ql.dynamic_code(), 64)
    np.testing.assert_array_equal(q, ql.quantize_blockwise(x, ql.dynamic_code(), 64)[0])
    monkeypatch.setenv("QUANTLAB_BACKEND", "gpu")
    with pytest.raises(ValueError, match="backend"):
        kernels.quantize_blockwise(x, ql.dynamic_code(), 64)


def test_parallel_kernels_use_the_workqueue_layer_unless_told_otherwise():
    # Numba's OpenMP layer spin-waits against torch's OpenMP threads (an 8-bit step 60x slower
    # between a model's forward and backward passes); a fresh process shows which layer runs.
    script = ("import numpy as np, numba; from quantlab import kernels, dynamic_code; "
              "kernels.quantize_blockwise(np.ones(4096, np.float32), dynamic_code(True), 256); "
              "print(numba.threading_layer())")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    default = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert default.stdout.split()[-1] == "workqueue"
    chosen = subprocess.run([sys.executable, "-c", script], env={**env, "NUMBA_THREADING_LAYER": "omp"},
                            capture_output=True, text=True, check=True)
    assert chosen.stdout.split()[-1] == "omp"
