"""Codes, inputs and the comparison shared by the CPU and CUDA kernel tests."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quantlab as ql
from quantlab import kernels, reference

SHIPPED_CODES = (
    [ql.dynamic_code(signed, bits) for signed in (True, False) for bits in range(2, 9)]
    + [ql.dynamic_code(True, bits, symmetric=True) for bits in range(2, 9)]
    + [ql.linear_code(bits, signed) for signed in (True, False) for bits in range(2, 9)]
    + [ql.fp8_code("e4m3"), ql.fp8_code("e5m2"),
       ql.quantile_code(np.random.default_rng(0).standard_t(3, 20_000), 8),
       ql.quantile_code(np.random.default_rng(1).exponential(1.0, 20_000), 4)]
)

SPECIAL_VALUES = [0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 1e-30, 1.0, -1.0, 0.5, -0.5, 3.4e38, -3.4e38,
                  1e-7, 12345.678]


def float_arrays(max_elements: int):
    """float32 arrays of 1-3 dims with normal, huge, tiny, subnormal, repeated and signed-zero values."""
    elements = st.one_of(
        st.floats(-1e6, 1e6, width=32, allow_subnormal=True),
        st.floats(width=32, allow_nan=False, allow_infinity=False),
        st.sampled_from(SPECIAL_VALUES),
    )
    shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=max_elements).filter(
        lambda s: int(np.prod(s)) <= max_elements)
    return hnp.arrays(np.float32, shapes, elements=elements)


def block_sizes(max_block: int):
    return st.one_of(st.sampled_from([1, 2, 3, 7, 64, 100, 256, 1000, 2048, 4096]),
                     st.integers(1, max_block))


def assert_matches_reference(x, code, block_size, backend, noise=None):
    """q, absmax and the dequantized values of a kernel backend equal the reference bit for bit."""
    q, absmax = kernels.quantize_blockwise(x, code, block_size, noise=noise, backend=backend)
    ref_q, ref_absmax = ql.quantize_blockwise(x, code, block_size, noise=noise)
    assert q.dtype == np.uint8 and q.shape == np.shape(x)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_array_equal(absmax.view(np.uint32), ref_absmax.view(np.uint32))
    values = kernels.dequantize_blockwise(q, absmax, code, block_size, backend=backend)
    ref_values = ql.dequantize_blockwise(ref_q, ref_absmax, code, block_size)
    assert values.dtype == np.float32 and values.shape == np.shape(x)
    np.testing.assert_array_equal(values.view(np.uint32), ref_values.view(np.uint32))


def reference_adam_step_8bit(param, grad, m_q, m_absmax, v_q, v_absmax, hyper, signed, unsigned, block_size):
    """reference.step_8bit for Adam, flattened to (param, m_q, m_absmax, v_q, v_absmax)."""
    param, ((m_q, m_absmax), (v_q, v_absmax)) = reference.step_8bit(
        reference.adam_update, param, grad, [(m_q, m_absmax), (v_q, v_absmax)], [signed, unsigned], block_size, hyper)
    return param, m_q, m_absmax, v_q, v_absmax
