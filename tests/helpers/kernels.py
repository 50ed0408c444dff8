"""What the kernel tests share (CPU and CUDA, quantizers and fused steps): the shipped codes, hypothesis
inputs, spread-out test values, and bit-for-bit comparisons with the reference."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quantlab as ql
from quantlab import kernels, reference
from quantlab.codes import dynamic_code, linear_code
from quantlab.kernels import cpu
from quantlab.kernels.lookup import search_tables

EMPTY_F32 = np.zeros(0, np.float32)  # the kernels' unused state slot

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


SIGNED_CODES = [dynamic_code(True), dynamic_code(True, 8, symmetric=True), linear_code(8, True)]


UNSIGNED_CODES = [dynamic_code(False), linear_code(8, False)]


def spread_np(rng, n, low_decade, high_decade, zero_fraction):
    """Normal values scaled over [10**low, 10**high], with a fraction of exact zeros (and -0.0)."""
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(low_decade, high_decade, n)
    x[rng.random(n) < zero_fraction] = 0.0
    x[rng.random(n) < zero_fraction / 4] = -0.0
    return x.astype(np.float32)


def kernel_step_8bit(kind, param, grad, q, absmax, code, hyper, block_size):
    """cpu.step_8bit with one state: the second state slot gets empty arrays and the same code."""
    p, q, absmax = param.copy(), q.copy(), absmax.copy()
    table = search_tables(code)[0].args()
    cpu.step_8bit(kind, 1, p, grad.copy(), hyper, block_size, q, absmax, code.values, table, code.zero_index,
                  np.zeros(0, np.uint8), np.zeros(0, np.float32), code.values, table, code.zero_index)
    return p, q, absmax


def check_step_8bit(kind, update, arrays, hyper, block_size, code):
    param, grad, state = arrays
    q, absmax = reference.quantize_blockwise(state, code, block_size)
    expected_p, [(expected_q, expected_absmax)] = reference.step_8bit(
        update, param, grad, [(q, absmax)], [code], block_size, hyper)
    p_k, q_k, absmax_k = kernel_step_8bit(kind, param, grad, q, absmax, code, hyper, block_size)
    assert_bits_equal(p_k, expected_p, "param")
    assert_bits_equal(q_k, expected_q, "q")
    assert_bits_equal(absmax_k, expected_absmax, "absmax")


def check_step_32bit(kind, update, arrays, hyper):
    param, grad, state = arrays
    expected_p, expected_state = update(param, grad, state, hyper)
    p_k, state_k = param.copy(), state.copy()
    cpu.step_32bit(kind, 1, p_k, grad.copy(), state_k, EMPTY_F32, hyper)
    assert_bits_equal(p_k, expected_p, "param")
    assert_bits_equal(state_k, expected_state, "state")


def assert_bits_equal(actual, expected, what=""):
    actual, expected = np.ascontiguousarray(actual), np.ascontiguousarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.dtype == np.float32:
        actual, expected = actual.view(np.uint32), expected.view(np.uint32)
    assert np.array_equal(actual, expected), f"{what}: {np.count_nonzero(actual != expected)} elements differ"
