"""The fused Adam kernels of quantlab.kernels.cpu against the NumPy reference, bit for bit.

Hypothesis draws the sizes, block sizes, codes, hyperparameters and a seed; the arrays come from a
NumPy generator seeded with it (values over many decades, exact zeros, all-zero blocks), which
keeps each example fast for the sizes asked for (up to 5000 and 300000 elements).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.kernels import SIGNED_CODES, UNSIGNED_CODES, block_sizes, reference_adam_step_8bit, spread_np
from quantlab import reference
from quantlab.kernels import cpu, scalar
from quantlab.kernels.lookup import search_tables
from quantlab.kernels.scalar import INF_BITS

ADAM_8BIT_EXAMPLES = 2000
ADAM_32BIT_EXAMPLES = 1000
LARGEST_MAGNITUDE_EXAMPLES = 300
NONFINITE_EXAMPLES = 300


CHUNK = 1 << 16  # largest_magnitude_bits' default chunk


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def assert_bits_equal(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.dtype == np.float32:
        actual, expected = actual.view(np.uint32), expected.view(np.uint32)
    mismatch = np.flatnonzero(actual != expected)
    assert mismatch.size == 0, f"{what}: {mismatch.size} elements differ, first at {mismatch[:5]}"


@st.composite
def adam_hyper(draw):
    """(hyper, description) for Adam (L2 decay) or AdamW (decoupled decay)."""
    lr = 10.0 ** draw(st.floats(-6, -0.5))
    beta1 = draw(st.one_of(st.just(0.9), st.floats(0.0, 0.999)))
    beta2 = draw(st.one_of(st.just(0.999), st.floats(0.0, 0.99999)))
    eps = 10.0 ** draw(st.floats(-12, -3))
    weight_decay = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5)))
    decoupled = draw(st.booleans())
    step = draw(st.integers(1, 1000))
    hyper = reference.adam_hyperparameters(lr, beta1, beta2, eps, weight_decay, decoupled, step)
    assert hyper.dtype == np.float32 and hyper.shape == (8,)
    return hyper


@st.composite
def adam_arrays(draw, max_n):
    """param, grad, m (signed), v (>= 0) as float32; zero_fraction 0 .. 0.9 (0.9 makes all-zero blocks)."""
    # sizes around block and task boundaries too (tasks of 16 blocks, or of STEP_CHUNK elements)
    serial, chunk = cpu.SERIAL_ELEMENTS, cpu.STEP_CHUNK
    n = draw(st.one_of(st.sampled_from([1, 2, 255, 256, 257, serial, serial + 1, 3 * serial + 7, chunk + 1]),
                       st.integers(1, max_n)))
    seed = draw(st.integers(0, 2**32 - 1))
    zero_fraction = draw(st.sampled_from([0.0, 0.05, 0.5, 0.9]))
    fresh = draw(st.booleans())  # the first step starts from all-zero states
    rng = np.random.default_rng(seed)
    param = spread_np(rng, n, -8, 2, zero_fraction)
    grad = spread_np(rng, n, -9, 2, zero_fraction)
    if fresh:
        m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    else:
        m = spread_np(rng, n, -9, 1, zero_fraction)
        v = np.abs(spread_np(rng, n, -16, 2, zero_fraction))
    return param, grad, m, v


@settings(max_examples=ADAM_8BIT_EXAMPLES, deadline=None)
@given(arrays=adam_arrays(5000), hyper=adam_hyper(), block_size=block_sizes(5000),
       signed=st.sampled_from(SIGNED_CODES), unsigned=st.sampled_from(UNSIGNED_CODES))
def test_adam_step_8bit_matches_reference(arrays, hyper, block_size, signed, unsigned):
    param, grad, m, v = arrays
    m_q, m_absmax = reference.quantize_blockwise(m, signed, block_size)
    v_q, v_absmax = reference.quantize_blockwise(v, unsigned, block_size)
    expected = reference_adam_step_8bit(param, grad, m_q, m_absmax, v_q, v_absmax, hyper, signed, unsigned,
                                        block_size)

    p_k, mq_k, ma_k, vq_k, va_k = (a.copy() for a in (param, m_q, m_absmax, v_q, v_absmax))
    cpu.step_8bit(scalar.ADAM, 2, p_k, grad.copy(), hyper, block_size,
                  mq_k, ma_k, signed.values, search_tables(signed)[0].args(), signed.zero_index,
                  vq_k, va_k, unsigned.values, search_tables(unsigned)[0].args(), unsigned.zero_index)

    for name, actual, exp in zip(("param", "m_q", "m_absmax", "v_q", "v_absmax"),
                                 (p_k, mq_k, ma_k, vq_k, va_k), expected):
        assert_bits_equal(actual, exp, name)


@settings(max_examples=ADAM_32BIT_EXAMPLES, deadline=None)
@given(arrays=adam_arrays(5000), hyper=adam_hyper())
def test_adam_step_32bit_matches_reference(arrays, hyper):
    param, grad, m, v = arrays
    expected = reference.adam_update(param, grad, m, v, hyper)
    p_k, m_k, v_k = param.copy(), m.copy(), v.copy()
    cpu.step_32bit(scalar.ADAM, 2, p_k, grad.copy(), m_k, v_k, hyper)
    for name, actual, exp in zip(("param", "m", "v"), (p_k, m_k, v_k), expected):
        assert_bits_equal(actual, exp, name)


sizes_across_chunks = st.one_of(
    st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, 300_000]),
    st.integers(0, 300_000))


def finite_test_array(rng, n):
    # subnormals (and underflow to 0) up to the largest finite float32
    big = float(np.finfo(np.float32).max)
    x = np.clip(rng.standard_normal(n) * 10.0 ** rng.uniform(-46, 38.5, n), -big, big).astype(np.float32)
    x[rng.random(n) < 0.1] = 0.0
    if n:  # place a few extreme finite values anywhere, including past the first chunk
        specials = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-45, -1e-45, -0.0],
                            np.float32)
        x[rng.integers(0, n, specials.size)] = specials[rng.permutation(specials.size)]
    return x


@settings(max_examples=LARGEST_MAGNITUDE_EXAMPLES, deadline=None)
@given(n=sizes_across_chunks, seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1.0, 1e-40, 0.0]))
def test_largest_magnitude_bits_of_finite_arrays(n, seed, scale):
    rng = np.random.default_rng(seed)
    x = (finite_test_array(rng, n) * np.float32(scale)).astype(np.float32)
    expected = int(np.max(_bits(np.abs(x)))) if n else 0
    got = int(cpu.largest_magnitude_bits(x.view(np.int32)))
    assert got == expected
    assert got < INF_BITS


NONFINITE = {"nan": np.float32(np.nan), "-nan": -np.float32(np.nan), "inf": np.float32(np.inf),
             "-inf": -np.float32(np.inf),
             "nan-payload": np.array([0x7F800001], np.uint32).view(np.float32)[0],
             "-nan-payload": np.array([0xFFFFFFFF], np.uint32).view(np.float32)[0]}


@settings(max_examples=NONFINITE_EXAMPLES, deadline=None)
@given(n=sizes_across_chunks.filter(lambda n: n > 0), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(sorted(NONFINITE)), count=st.integers(1, 3),
       where=st.sampled_from(["random", "first", "last", "chunk-start"]))
def test_largest_magnitude_bits_flags_nan_and_inf(n, seed, kind, count, where):
    rng = np.random.default_rng(seed)
    x = finite_test_array(rng, n)
    assert int(cpu.largest_magnitude_bits(x.view(np.int32))) < INF_BITS
    positions = {"random": rng.integers(0, n, count), "first": [0], "last": [n - 1],
                 "chunk-start": [min(CHUNK, n - 1)]}[where]
    x[positions] = NONFINITE[kind]
    assert not np.all(np.isfinite(x))
    got = int(cpu.largest_magnitude_bits(x.view(np.int32)))
    assert got >= INF_BITS
    assert got == int(np.max(_bits(x) & np.uint32(0x7FFFFFFF)))


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 17, CHUNK - 1, CHUNK + 1, 100_000]), min_size=1, max_size=6),
       seed=st.integers(0, 2**32 - 1), bad=st.integers(-1, 5))
def test_largest_magnitude_bits_over_several_arrays(sizes, seed, bad):
    """One launch over several arrays: the maximum over all of them, and a NaN in any one of them
    (bad = its index; -1: none) is seen."""
    rng = np.random.default_rng(seed)
    arrays = [finite_test_array(rng, n) for n in sizes]
    if 0 <= bad < len(arrays) and arrays[bad].size:
        arrays[bad][rng.integers(0, arrays[bad].size)] = np.nan
    expected = max((int(np.max(_bits(a) & np.uint32(0x7FFFFFFF))) for a in arrays if a.size), default=0)
    assert cpu.largest_magnitude_bits(*(a.view(np.int32) for a in arrays)) == expected


def test_kernel_wrappers_refuse_arrays_of_the_wrong_size():
    """The kernels read raw memory: their NumPy wrappers check every size and dtype first."""
    n, block_size = 1000, 64
    code = SIGNED_CODES[0]
    p, g = np.zeros(n, np.float32), np.zeros(n, np.float32)
    q, absmax = np.zeros(n, np.uint8), np.zeros(reference.num_blocks(n, block_size), np.float32)
    hyper = reference.adam_hyperparameters(1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1)
    table = search_tables(code)[0].args()
    for bad in ({"q": q[:-1]}, {"absmax": absmax[:-1]}, {"g": g[:10]}, {"q": q.astype(np.int8)}):
        args = {"p": p, "g": g, "q": q, "absmax": absmax, **bad}
        with pytest.raises(ValueError, match="must be a contiguous 1-D"):
            cpu.step_8bit(scalar.ADAM, 2, args["p"], args["g"], hyper, block_size, args["q"], args["absmax"],
                          code.values, table, code.zero_index, args["q"], args["absmax"], code.values, table,
                          code.zero_index)
    with pytest.raises(ValueError, match="state 2"):
        cpu.step_32bit(scalar.ADAM, 2, p, g, p.copy(), p[:5].copy(), hyper)
    with pytest.raises(ValueError, match="contiguous"):
        cpu.largest_magnitude_bits(p.view(np.int32)[::2])
