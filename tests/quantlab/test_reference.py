"""Property tests for quantlab.reference, the NumPy oracle every backend is compared with.

Each property is checked against an independent statement written here (brute-force nearest
search in float64, python loops over blocks), over every shipped code, block sizes from
{1, 2, 3, 7, 64, 100, 256, 1000, 2048, 4096} and 1..5000, and float32 inputs with special values.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantlab.codes import Code, dynamic_code, fp8_code, linear_code, quantile_code
from quantlab.reference import dequantize, dequantize_blockwise, quantize, quantize_blockwise

# max_examples of each hypothesis property (reported by the lead).
EX_NEAREST = 300
EX_BLOCKWISE = 250
EX_ERROR_BOUND = 200
EX_REQUANTIZE = 200
EX_MONOTONE = 150
EX_EXACT_VALUES = 200
EX_ZERO_BLOCKS = 100
EX_INDEPENDENT = 100
EX_STOCHASTIC = 200
EX_DTYPES = 100
EX_NONFINITE = 100
EX_UNCHANGED = 100


def _settings(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the codes ---------------------------------------------------------------------------------

_rng = np.random.default_rng(11)
_SAMPLES = {"normal": _rng.standard_normal(20_000), "heavy": _rng.standard_t(2, 20_000),
            "nonneg": _rng.exponential(1.0, 20_000)}
CODES = (
    [dynamic_code(s, b) for s in (True, False) for b in range(2, 9)]
    + [dynamic_code(True, b, symmetric=True) for b in range(2, 9)]
    + [linear_code(b, signed=s) for s in (True, False) for b in range(2, 9)]
    + [fp8_code("e4m3"), fp8_code("e5m2")]
    + [quantile_code(_SAMPLES[s], b) for s in _SAMPLES for b in (3, 8)]
)
code_strategy = st.sampled_from(CODES)

BLOCK_SIZES = st.one_of(st.sampled_from([1, 2, 3, 7, 64, 100, 256, 1000, 2048, 4096]),
                        st.integers(1, 5000))

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32, 2**-126
SPECIALS = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0, -3.0,
                     2.0**-149, -(2.0**-149), 2.0**-140, F32_TINY, -F32_TINY,
                     float(np.nextafter(np.float32(F32_TINY), np.float32(0))),  # largest subnormal
                     1e-30, -1e-30, 1e30, -1e30, F32_MAX, -F32_MAX], dtype=np.float32)
ELEMENTS = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                     st.sampled_from(SPECIALS.tolist()))

SHAPES = st.one_of(
    st.tuples(st.integers(1, 3000)),
    st.tuples(st.integers(1, 60), st.integers(1, 50)),
    st.tuples(st.integers(1, 14), st.integers(1, 14), st.integers(1, 15)),
    st.just(()),
)


def tie_pool(code: Code) -> np.ndarray:
    """Normalised values that stress the rounding: the code values, the exact midpoints of
    neighbours (where representable in float32; otherwise their nearest float32) and the float32
    numbers just below and above each midpoint."""
    c = code.values.astype(np.float64)
    mid = ((c[:-1] + c[1:]) / 2).astype(np.float32)
    up, down = np.nextafter(mid, np.float32(2)), np.nextafter(mid, np.float32(-2))
    return np.concatenate([code.values, mid, up, down, [np.float32(1), np.float32(-1)]]).astype(np.float32)


@st.composite
def float32_arrays(draw, code=None, block_size=None):
    """float32 arrays of up to 3 dims and 3000 elements.

    Three kinds: (a) hypothesis arrays of arbitrary finite float32 and special values (mostly one
    repeated fill value plus a few distinct ones); (b) a random bulk (normal, heavy-tailed,
    uniform, small integers with many repeats) at a magnitude from 1e-40 to 1e38, with special
    values written over a few positions; (c) with ``code`` given: values u * 2**k with u from the
    code's tie pool and +/-2**k at the start of every block, so that x / absmax is exactly a code
    value, an exact midpoint (a tie) or its float32 neighbour.
    """
    shape = draw(SHAPES)
    n = math.prod(shape)
    kinds = ["hypothesis", "bulk"] + (["ties"] if code is not None else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "hypothesis":
        return draw(hnp.arrays(np.float32, shape, elements=ELEMENTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "bulk":
        dist = draw(st.sampled_from(["normal", "heavy", "uniform", "integers"]))
        base = {"normal": lambda: rng.standard_normal(n),
                "heavy": lambda: rng.standard_t(1.5, n),
                "uniform": lambda: rng.uniform(-1, 1, n),
                "integers": lambda: rng.integers(-3, 4, n).astype(np.float64)}[dist]()
        scale = 10.0 ** draw(st.integers(-40, 38))
        x = np.clip(base * scale, -F32_MAX, F32_MAX).astype(np.float32)
        for _ in range(draw(st.integers(0, 4))):
            x[rng.integers(n)] = draw(st.sampled_from(SPECIALS.tolist()))
        return x.reshape(shape)
    scale = np.float32(2.0 ** draw(st.integers(-60, 60)))
    x = rng.choice(tie_pool(code), n) * scale
    step = block_size if block_size is not None else n
    x[::step] = np.where(rng.random(x[::step].size) < 0.5, scale, -scale)
    return x.astype(np.float32).reshape(shape)


@st.composite
def blockwise_cases(draw):
    code = draw(code_strategy)
    block_size = draw(st.one_of(BLOCK_SIZES, st.integers(1, 64)))  # small blocks: many per array
    x = draw(float32_arrays(code, block_size))
    return code, block_size, x


# --- independent statements of the algorithm ---------------------------------------------------

def nearest_brute_force(u, values) -> np.ndarray:
    """Index of the code value nearest to each u, ties (equal distances) to the lower index.

    Distances are taken in float64, for normalised u (|u| <= 2; for huge u every distance rounds
    to the same float64). u and the code values are float32; near a decision point u lies between
    two neighbouring values of comparable magnitude (or one of them is 0), so u - c is exact in
    float64 there and ties are detected exactly. Far from a decision point a rounding of the
    distances by 2**-53 relative cannot change which value is nearest.
    """
    u64 = np.asarray(u, np.float64).reshape(-1)
    c64 = np.asarray(values, np.float64)
    dist = np.abs(u64[:, None] - c64[None, :])
    best = dist.min(axis=1, keepdims=True)
    return np.argmax(dist == best, axis=1)  # the first index reaching the minimum


def block_bounds(n, block_size):
    return [(start, min(start + block_size, n)) for start in range(0, n, block_size)]


def expected_absmax(flat, block_size) -> np.ndarray:
    """max |x| of each block, with a python loop (abs and max of float32 values are exact)."""
    return np.array([max(abs(float(v)) for v in flat[s:e]) for s, e in block_bounds(flat.size, block_size)],
                    dtype=np.float32)


def expected_u(flat, block_size, absmax) -> np.ndarray:
    """x / absmax of its block in IEEE float32; 0 in a block whose absmax is 0."""
    per_element = np.repeat(absmax, [e - s for s, e in block_bounds(flat.size, block_size)])
    u = np.zeros_like(flat)
    nz = per_element > 0
    u[nz] = flat[nz] / per_element[nz]
    return u


def lower_neighbour(u, values) -> np.ndarray:
    """Index of the largest code value <= u; -1 where u is below every code value."""
    return np.searchsorted(values, u, side="right") - 1


def ulp32(a) -> np.ndarray:
    """The float32 spacing at |a| (as float64); at the largest float32, the spacing of its binade."""
    below_max = np.nextafter(np.float32(F32_MAX), np.float32(0))
    return np.spacing(np.minimum(np.abs(np.asarray(a, np.float32)), below_max)).astype(np.float64)


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --- nearest rounding --------------------------------------------------------------------------

@st.composite
def normalised_inputs(draw):
    code = draw(code_strategy)
    shape = draw(SHAPES)
    n = math.prod(shape)
    kind = draw(st.sampled_from(["hypothesis", "uniform", "ties"]))
    if kind == "hypothesis":
        u = draw(hnp.arrays(np.float32, shape, elements=st.one_of(
            st.floats(-1, 1, width=32), st.sampled_from(tie_pool(code).tolist()))))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if kind == "uniform":
            u = rng.uniform(-1, 1, n).astype(np.float32) ** draw(st.sampled_from([1, 3, 9]))
        else:
            u = rng.choice(tie_pool(code), n)
    return code, np.asarray(u, np.float32).reshape(shape)


@_settings(EX_NEAREST)
@given(normalised_inputs())
def test_quantize_is_nearest_code_value_ties_to_lower(case):
    code, u = case
    q = quantize(u, code)
    assert q.dtype == np.uint8 and q.shape == u.shape
    assert np.array_equal(q.reshape(-1), nearest_brute_force(u, code.values))


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_quantize_around_every_decision_point(code):
    """Exhaustively: the float32 numbers within 16 ulps of every midpoint, both signs of zero,
    and values beyond the ends of the code."""
    c = code.values.astype(np.float64)
    mids = ((c[:-1] + c[1:]) / 2).astype(np.float32)
    u = [mids]
    up = down = mids
    for _ in range(16):
        up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(-2))
        u += [up, down]
    u = np.concatenate(u + [np.array([0.0, -0.0, 1.0, -1.0, 1.5, -1.5], np.float32)])
    assert np.array_equal(quantize(u, code), nearest_brute_force(u, code.values))


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_quantize_of_code_values_is_identity(code):
    # quantize(dequantize(q)) == q for every index: each code value is its own nearest value.
    q = np.arange(len(code), dtype=np.uint8)
    assert np.array_equal(quantize(dequantize(q, code), code), q)


def test_quantize_exact_tie_goes_to_lower_index():
    code = Code([-1.0, 0.0, 0.5, 1.0])
    u = np.array([0.25, 0.75, -0.5, np.nextafter(np.float32(0.25), np.float32(1))], np.float32)
    assert quantize(u, code).tolist() == [1, 2, 0, 2]


# --- block-wise quantization -------------------------------------------------------------------

@_settings(EX_BLOCKWISE)
@given(blockwise_cases())
def test_blockwise_matches_definition(case):
    """q and absmax follow docs/design.md section 2: absmax = max|x| per block of the C-order flattened
    array (last block shorter), u = x / absmax in float32, q = nearest code value of u."""
    code, block_size, x = case
    q, absmax = quantize_blockwise(x, code, block_size)
    flat = x.reshape(-1)
    assert q.dtype == np.uint8 and q.shape == x.shape
    assert absmax.dtype == np.float32 and absmax.shape == (-(-flat.size // block_size),)
    want_absmax = expected_absmax(flat, block_size)
    assert same_bits(absmax, want_absmax)
    u = expected_u(flat, block_size, want_absmax)
    assert np.array_equal(q.reshape(-1), nearest_brute_force(u, code.values))


def local_error_bound(u, values) -> np.ndarray:
    """Half the gap between the code values that bracket u; beyond an end, the distance to it."""
    c = values.astype(np.float64)
    u = u.astype(np.float64)
    i = np.clip(np.searchsorted(c, u, side="right") - 1, 0, c.size - 2)
    half_gap = (c[i + 1] - c[i]) / 2
    return np.where(u < c[0], c[0] - u, np.where(u > c[-1], u - c[-1], np.where(u == c[-1], 0.0, half_gap)))


@_settings(EX_ERROR_BOUND)
@given(blockwise_cases())
def test_blockwise_reconstruction_error_bound(case):
    """|dequantize(quantize(x)) - x| <= absmax * bound(u) + rounding, where the rounding allowed is
    half an ulp of the result (the float32 product code[q] * absmax) plus absmax * half an ulp of
    u (u = x / absmax is itself rounded to float32: a value just past a decision point can round
    onto it). Half an ulp of the result alone would not do: when code[q] == 0 the result is 0."""
    code, block_size, x = case
    q, absmax = quantize_blockwise(x, code, block_size)
    x_hat = dequantize_blockwise(q, absmax, code, block_size)
    assert x_hat.dtype == np.float32 and x_hat.shape == x.shape
    flat, rec = x.reshape(-1), x_hat.reshape(-1)
    a = np.repeat(absmax, [e - s for s, e in block_bounds(flat.size, block_size)]).astype(np.float64)
    u = expected_u(flat, block_size, absmax)
    err = np.abs(rec.astype(np.float64) - flat.astype(np.float64))
    rounding = (ulp32(rec) + a * ulp32(u)) / 2
    bound = a * local_error_bound(u, code.values) + rounding
    bad = np.flatnonzero(err > bound)
    assert bad.size == 0, (bad[:5], flat[bad[:5]], rec[bad[:5]], bound[bad[:5]])


@_settings(EX_REQUANTIZE)
@given(blockwise_cases())
def test_requantizing_a_reconstruction_gives_the_same_indices(case):
    """quantize_blockwise(dequantize_blockwise(q)) == q, block by block, whenever

    (1) the block's absmax is reconstructed exactly, i.e. max|x_hat| == absmax. This holds when the
        code contains +1.0 for a positive block maximum and -1.0 for a negative one (u = +/-1
        exactly, code[q] * absmax == +/-absmax, and every other |code[q]| * absmax <= absmax);
        it fails for the bitsandbytes signed map on a negative maximum (-1.0 is not in it: the
        new absmax is 0.99296875 * absmax and every u shifts by 0.7%); and
    (2) every non-zero reconstructed value is a normal float32. Then
        fl(fl(c * a) / a) = c (1 + d1)(1 + d2) with |d| <= 2**-24, within 2**-23 |c| of c, and the
        nearest code value of it is c because the shipped codes' neighbours are more than
        2**-16 |c| apart (test_codes.test_relative_gaps_far_above_float32_precision). With a
        subnormal (or underflowed) reconstruction the absolute rounding error 2**-150 / absmax can
        exceed the local gap, and the property is false.
    Blocks whose absmax is 0 reconstruct as zeros and re-quantize to code.zero_index, as before.
    """
    code, block_size, x = case
    q, absmax = quantize_blockwise(x, code, block_size)
    x_hat = dequantize_blockwise(q, absmax, code, block_size)
    q2, absmax2 = quantize_blockwise(x_hat, code, block_size)
    flat_hat, fq, fq2 = x_hat.reshape(-1), q.reshape(-1), q2.reshape(-1)
    checked = 0
    for b, (s, e) in enumerate(block_bounds(flat_hat.size, block_size)):
        block = flat_hat[s:e]
        exact_max = absmax2[b] == absmax[b]
        normal = np.all((block == 0) | (np.abs(block) >= F32_TINY))
        if exact_max and normal:
            checked += 1
            assert np.array_equal(fq2[s:e], fq[s:e]), (b, absmax[b])
        if absmax[b] == 0:
            assert absmax2[b] == 0
    # Condition (1) is guaranteed whenever the code has +1.0 and -1.0 (symmetric and linear signed)
    if code.values[0] == -1.0 and code.values[-1] == 1.0:
        assert np.array_equal(absmax2, absmax)


@_settings(EX_MONOTONE)
@given(blockwise_cases())
def test_blockwise_is_monotone_within_a_block(case):
    """x_i <= x_j implies q_i <= q_j for two elements of the same block (equal x, equal q)."""
    code, block_size, x = case
    q, _ = quantize_blockwise(x, code, block_size)
    flat, fq = x.reshape(-1), q.reshape(-1).astype(np.int64)
    for s, e in block_bounds(flat.size, block_size):
        order = np.argsort(flat[s:e], kind="stable")
        xs, qs = flat[s:e][order], fq[s:e][order]
        assert np.all(np.diff(qs) >= 0)
        assert np.all(qs[1:][xs[1:] == xs[:-1]] == qs[:-1][xs[1:] == xs[:-1]])


@_settings(EX_EXACT_VALUES)
@given(blockwise_cases())
def test_absmax_element_and_zeros_reconstruct_exactly(case):
    """The element equal to +absmax is reconstructed exactly when the code contains +1.0, the one
    equal to -absmax when it contains -1.0; zeros (+0.0 and -0.0) become +0.0."""
    code, block_size, x = case
    q, absmax = quantize_blockwise(x, code, block_size)
    x_hat = dequantize_blockwise(q, absmax, code, block_size)
    flat, rec = x.reshape(-1), x_hat.reshape(-1)
    has_plus_one, has_minus_one = 1.0 in code.values, -1.0 in code.values
    for b, (s, e) in enumerate(block_bounds(flat.size, block_size)):
        xb, rb = flat[s:e], rec[s:e]
        if absmax[b] > 0:
            if has_plus_one:
                assert np.all(rb[xb == absmax[b]] == absmax[b])
            if has_minus_one:
                assert np.all(rb[xb == -absmax[b]] == -absmax[b])
    zeros = flat == 0
    assert np.all(rec[zeros] == 0)
    assert not np.any(np.signbit(rec[zeros]))
    assert np.all(q.reshape(-1)[zeros] == code.zero_index)


@_settings(EX_ZERO_BLOCKS)
@given(blockwise_cases(), st.data())
def test_all_zero_blocks(case, data):
    """A block of zeros (either sign) stores absmax +0.0 and code.zero_index, and dequantizes to
    +0.0."""
    code, block_size, x = case
    flat = x.reshape(-1).copy()
    bounds = block_bounds(flat.size, block_size)
    zeroed = data.draw(st.sets(st.integers(0, len(bounds) - 1), min_size=1, max_size=len(bounds)))
    signs = data.draw(st.sampled_from(["+0", "-0", "mixed"]))
    for b in zeroed:
        s, e = bounds[b]
        flat[s:e] = {"+0": 0.0, "-0": -0.0, "mixed": np.where(np.arange(e - s) % 2, 0.0, -0.0)}[signs]
    x = flat.reshape(x.shape)
    q, absmax = quantize_blockwise(x, code, block_size)
    x_hat = dequantize_blockwise(q, absmax, code, block_size).reshape(-1)
    fq = q.reshape(-1)
    for b in zeroed:
        s, e = bounds[b]
        assert absmax[b] == 0 and not np.signbit(absmax[b])
        assert np.all(fq[s:e] == code.zero_index)
        assert np.all(x_hat[s:e] == 0) and not np.any(np.signbit(x_hat[s:e]))


@_settings(EX_INDEPENDENT)
@given(blockwise_cases(), st.data())
def test_blocks_are_independent(case, data):
    """Each block's q and absmax depend on that block only: quantizing the block alone gives the
    same result, and rewriting one block leaves every other block unchanged."""
    code, block_size, x = case
    flat = x.reshape(-1)
    q, absmax = quantize_blockwise(x, code, block_size)
    fq = q.reshape(-1)
    bounds = block_bounds(flat.size, block_size)
    for b in data.draw(st.lists(st.integers(0, len(bounds) - 1), max_size=3)):
        s, e = bounds[b]
        q_alone, absmax_alone = quantize_blockwise(flat[s:e], code, block_size)
        assert np.array_equal(q_alone, fq[s:e]) and same_bits(absmax_alone, absmax[b:b + 1])
    b = data.draw(st.integers(0, len(bounds) - 1))
    s, e = bounds[b]
    changed = flat.copy()
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    changed[s:e] = (rng.standard_normal(e - s) * 10.0 ** data.draw(st.integers(-30, 30))).astype(np.float32)
    q2, absmax2 = quantize_blockwise(changed.reshape(x.shape), code, block_size)
    fq2 = q2.reshape(-1)
    others = np.ones(flat.size, bool)
    others[s:e] = False
    assert np.array_equal(fq2[others], fq[others])
    assert same_bits(np.delete(absmax2, b), np.delete(absmax, b))


def test_short_last_block():
    code = linear_code(3)
    x = np.array([0.5, -1.0, 0.25, 0.0,   2.0, 1.0, -2.0, 0.5,   -0.75, 0.375], np.float32)
    q, absmax = quantize_blockwise(x, code, 4)
    assert absmax.tolist() == [1.0, 2.0, 0.75]
    u = np.concatenate([x[:4] / 1.0, x[4:8] / 2.0, x[8:] / np.float32(0.75)]).astype(np.float32)
    assert np.array_equal(q, nearest_brute_force(u, code.values))
    x_hat = dequantize_blockwise(q, absmax, code, 4)
    assert x_hat.shape == (10,) and x_hat[8] == np.float32(-0.75)  # -1.0 is in linear3-signed
    # a short block of negative values: absmax is not affected by padding
    q, absmax = quantize_blockwise(np.array([3.0, -1.0, -0.5], np.float32), code, 2)
    assert absmax.tolist() == [3.0, 0.5] and q[2] == 0


@pytest.mark.parametrize("block_size", [11, 12, 4096, 10**6])
def test_block_size_at_least_the_input(block_size):
    code = dynamic_code()
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    q, absmax = quantize_blockwise(x, code, block_size)
    blocks = 1 if block_size >= 12 else 2
    assert absmax.shape == (blocks,)
    if blocks == 1:
        assert absmax[0] == np.max(np.abs(x))
        assert np.array_equal(q.reshape(-1), nearest_brute_force(x.reshape(-1) / absmax[0], code.values))
    assert dequantize_blockwise(q, absmax, code, block_size).shape == (3, 4)


def test_scalar_input():
    q, absmax = quantize_blockwise(np.float32(-3.5), dynamic_code(True, 8, symmetric=True), 7)
    assert q.shape == () and absmax.tolist() == [3.5]
    assert dequantize_blockwise(q, absmax, dynamic_code(True, 8, symmetric=True), 7) == np.float32(-3.5)


def test_numpy_integer_block_size_is_accepted():
    x = np.linspace(-1, 1, 50, dtype=np.float32)
    a = quantize_blockwise(x, dynamic_code(), 16)
    b = quantize_blockwise(x, dynamic_code(), np.int64(16))
    assert np.array_equal(a[0], b[0]) and same_bits(a[1], b[1])


# --- stochastic rounding -----------------------------------------------------------------------

@st.composite
def stochastic_cases(draw):
    code, u = draw(normalised_inputs())
    noise = draw(st.one_of(
        hnp.arrays(np.float32, u.shape, elements=st.floats(0, 1, exclude_max=True, width=32)),
        st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s).random(u.shape, dtype=np.float32)),
    ))
    return code, u, np.asarray(noise, np.float32)


@_settings(EX_STOCHASTIC)
@given(stochastic_cases())
def test_stochastic_rounding_picks_a_bracketing_neighbour(case):
    """The index is i or i + 1 where c[i] <= u < c[i+1]; exactly i when u == c[i]; the end index
    beyond either end of the code."""
    code, u, noise = case
    q = quantize(u, code, noise).reshape(-1).astype(np.int64)
    fu = u.reshape(-1)
    lo = lower_neighbour(fu, code.values)
    below = lo < 0
    assert np.all(q[below] == 0)
    top = lo == len(code) - 1
    assert np.all(q[top] == len(code) - 1)
    inside = ~below & ~top
    assert np.all((q[inside] == lo[inside]) | (q[inside] == lo[inside] + 1))
    on_value = inside & (fu == code.values[np.clip(lo, 0, None)])
    assert np.all(q[on_value] == lo[on_value])


@_settings(EX_STOCHASTIC)
@given(normalised_inputs())
def test_stochastic_rounding_with_zero_noise_rounds_up_off_the_grid(case):
    """The rule is: round up when noise < fraction = (u - c[i]) / (c[i+1] - c[i]) in float32. With
    noise 0 that is whenever fraction > 0, i.e. whenever c[i] < u (fraction cannot underflow to 0:
    u - c[i] >= 2**-149 and the gap is at most 1, the largest gap around 0.0 in [-1, 1])."""
    code, u = case
    q = quantize(u, code, np.zeros(u.shape, np.float32)).reshape(-1).astype(np.int64)
    fu = u.reshape(-1)
    lo = lower_neighbour(fu, code.values)
    inside = (lo >= 0) & (lo < len(code) - 1)
    strictly_above = inside & (fu > code.values[np.clip(lo, 0, None)])
    assert np.all(q[strictly_above] == lo[strictly_above] + 1)
    assert np.all(q[inside & ~strictly_above] == lo[inside & ~strictly_above])


def test_stochastic_rounding_largest_noise_rounds_down_off_the_grid():
    code = linear_code(4)
    u = np.array([0.01, 0.5, -0.3, 0.99], np.float32)
    noise = np.full(u.shape, np.nextafter(np.float32(1), np.float32(0)))
    lo = lower_neighbour(u, code.values)
    assert np.array_equal(quantize(u, code, noise), lo)


STAT_CODES = [dynamic_code(True, 8), dynamic_code(False, 4), dynamic_code(True, 5, symmetric=True),
              linear_code(3), fp8_code("e4m3"), quantile_code(_SAMPLES["heavy"], 8)]


@pytest.mark.parametrize("code", STAT_CODES, ids=lambda c: c.name)
def test_stochastic_rounding_is_unbiased(code):
    """E[dequantize(q)] = u. N = 200_000 draws per u; the mean is compared with u by a z-test with
    the exact standard deviation gap * sqrt(f (1 - f)) of one draw (f the exact fraction of u
    between its neighbours). |z| < 5 has a two-sided false-alarm rate of 5.7e-7 per check (36
    checks: ~2e-5 in all; the seed is fixed, so the test is deterministic anyway). The bias from
    the float32 noise grid (multiples of 2**-24) and the float32 fraction is at most ~2**-23 of
    the gap, i.e. a shift of z below 1e-4."""
    n = 200_000
    rng = np.random.default_rng(2024)
    c = code.values.astype(np.float64)
    intervals = np.linspace(0, len(code) - 2, 6).round().astype(int)
    for i, f in zip(intervals, [0.5, 0.1, 0.9, 0.3, 0.77, 0.05]):
        u = np.float32(c[i] + f * (c[i + 1] - c[i]))
        exact_f = (float(u) - c[i]) / (c[i + 1] - c[i])
        assert 0 < exact_f < 1
        noise = rng.random(n, dtype=np.float32)
        values = dequantize(quantize(np.full(n, u), code, noise), code).astype(np.float64)
        assert set(np.unique(values)) <= {c[i], c[i + 1]}
        sd = (c[i + 1] - c[i]) * math.sqrt(exact_f * (1 - exact_f))
        z = (values.mean() - float(u)) / (sd / math.sqrt(n))
        assert abs(z) < 5, (code.name, i, f, z)


def test_stochastic_blockwise_uses_the_same_rule():
    code = dynamic_code()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 9)).astype(np.float32)
    noise = rng.random(x.shape, dtype=np.float32)
    q, absmax = quantize_blockwise(x, code, 10, noise=noise)
    assert same_bits(absmax, expected_absmax(x.reshape(-1), 10))
    u = expected_u(x.reshape(-1), 10, absmax).reshape(x.shape)
    assert np.array_equal(q, quantize(u, code, noise))


# --- dtype policy ------------------------------------------------------------------------------

@_settings(EX_DTYPES)
@given(code_strategy, BLOCK_SIZES, SHAPES.flatmap(lambda s: hnp.arrays(
    np.float16, s, elements=st.floats(width=16, allow_nan=False, allow_infinity=False))))
def test_float16_input_is_widened_exactly(code, block_size, x16):
    expected = quantize_blockwise(x16.astype(np.float32), code, block_size)
    got = quantize_blockwise(x16, code, block_size)
    assert np.array_equal(got[0], expected[0]) and same_bits(got[1], expected[1])
    u16 = np.clip(x16, -1, 1)
    assert np.array_equal(quantize(u16, code), quantize(u16.astype(np.float32), code))


@_settings(EX_DTYPES)
@given(code_strategy, BLOCK_SIZES, SHAPES.flatmap(lambda s: hnp.arrays(
    np.float64, s, elements=st.floats(-F32_MAX, F32_MAX))))
def test_float64_input_is_rounded_to_float32(code, block_size, x64):
    expected = quantize_blockwise(x64.astype(np.float32), code, block_size)
    got = quantize_blockwise(x64, code, block_size)
    assert np.array_equal(got[0], expected[0]) and same_bits(got[1], expected[1])
    u64 = np.clip(x64, -1, 1)
    assert np.array_equal(quantize(u64, code), quantize(u64.astype(np.float32), code))


def test_bfloat16_input_is_widened_exactly():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(3).standard_normal(1000).astype(ml_dtypes.bfloat16)
    expected = quantize_blockwise(x.astype(np.float32), dynamic_code(), 64)
    got = quantize_blockwise(x, dynamic_code(), 64)
    assert np.array_equal(got[0], expected[0]) and same_bits(got[1], expected[1])


@pytest.mark.parametrize("dtype", ["int8", "int32", "int64", "uint8", "bool", "complex64", "complex128"])
def test_non_float_input_is_rejected_with_its_dtype(dtype):
    x = np.ones(10, dtype=dtype)
    with pytest.raises(TypeError, match=dtype):
        quantize_blockwise(x, dynamic_code(), 4)
    with pytest.raises(TypeError, match=dtype):
        quantize(x, dynamic_code())


def test_python_lists_follow_the_policy():
    as_list = quantize([0.1, -0.5], dynamic_code())
    assert np.array_equal(as_list, quantize(np.array([0.1, -0.5], np.float32), dynamic_code()))
    with pytest.raises(TypeError, match="int64"):
        quantize_blockwise([1, 2, 3], dynamic_code(), 2)


@pytest.mark.parametrize("code", [dynamic_code(), linear_code(3, signed=False), fp8_code("e5m2")],
                         ids=lambda c: c.name)
def test_dequantize_returns_float32(code):
    q = np.arange(len(code), dtype=np.uint8).reshape(-1, 1)
    assert dequantize(q, code).dtype == np.float32 and dequantize(q, code).shape == q.shape
    out = dequantize_blockwise(q, np.ones(-(-q.size // 3), np.float32), code, 3)
    assert out.dtype == np.float32 and out.shape == q.shape


# --- rejected input ----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@_settings(EX_NONFINITE)
@given(code_strategy, BLOCK_SIZES, SHAPES.filter(lambda s: math.prod(s) > 0), st.data())
def test_nan_and_inf_anywhere_are_rejected(code, block_size, shape, data):
    n = math.prod(shape)
    dtype = data.draw(st.sampled_from([np.float16, np.float32, np.float64]))
    x = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal(n).astype(dtype)
    bad = [np.nan, np.inf, -np.inf] + ([1e300, -1e300, 1e39] if dtype == np.float64 else [])
    for _ in range(data.draw(st.integers(1, 3))):
        x[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from(bad))
    x = x.reshape(shape)
    before = x.copy()
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_blockwise(x, code, block_size)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, code)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_blockwise(x, code, block_size, noise=np.zeros(shape, np.float32))
    assert same_bits(x, before)


def test_empty_input_is_rejected():
    for x in (np.zeros(0, np.float32), np.zeros((3, 0), np.float32), []):
        with pytest.raises(ValueError, match="empty"):
            quantize_blockwise(x, dynamic_code(), 4)


@pytest.mark.parametrize("block_size", [0, -1, 2.5, 4.0, True, False, None, "4", np.float32(4)])
def test_bad_block_size_is_rejected(block_size):
    x = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(x, dynamic_code(), block_size)
    with pytest.raises(ValueError, match="block_size"):
        dequantize_blockwise(np.zeros(8, np.uint8), np.ones(1, np.float32), dynamic_code(), block_size)


@pytest.mark.parametrize("noise, error, match", [
    (np.zeros(5, np.float32), ValueError, "shape"),
    (np.zeros((2, 3), np.float32), ValueError, "shape"),
    (np.zeros(6, np.float64), TypeError, "float32"),
    (np.zeros(6, np.float16), TypeError, "float32"),
    (np.full(6, -0.1, np.float32), ValueError, r"\[0, 1\)"),
    (np.full(6, 1.0, np.float32), ValueError, r"\[0, 1\)"),
    (np.full(6, np.nan, np.float32), ValueError, r"\[0, 1\)"),
])
def test_bad_noise_is_rejected(noise, error, match):
    x = np.linspace(-1, 1, 6, dtype=np.float32)
    with pytest.raises(error, match=match):
        quantize(x, dynamic_code(), noise)
    with pytest.raises(error, match=match):
        quantize_blockwise(x, dynamic_code(), 4, noise=noise)


@pytest.mark.parametrize("q, absmax, error, match", [
    (np.zeros(8, np.int64), np.ones(2, np.float32), TypeError, "uint8"),
    (np.zeros(8, np.int8), np.ones(2, np.float32), TypeError, "uint8"),
    (np.full(8, 255, np.uint8), np.ones(2, np.float32), ValueError, "index 255"),  # 255 values
    (np.zeros(8, np.uint8), np.ones(3, np.float32), ValueError, "absmax has 3 entries"),
    (np.zeros(8, np.uint8), np.ones(1, np.float32), ValueError, "absmax has 1 entries"),
    (np.zeros(8, np.uint8), np.ones(2, np.float64), TypeError, "float32"),
    (np.zeros(8, np.uint8), np.ones((2, 1), np.float32), TypeError, "1-D"),
    (np.zeros(8, np.uint8), np.array([1.0, -1.0], np.float32), ValueError, "non-negative"),
    (np.zeros(8, np.uint8), np.array([1.0, np.nan], np.float32), ValueError, "finite"),
    (np.zeros(8, np.uint8), np.array([np.inf, 1.0], np.float32), ValueError, "finite"),
])
def test_bad_dequantize_blockwise_input_is_rejected(q, absmax, error, match):
    code = dynamic_code(True, 8, symmetric=True)
    q_before, absmax_before = q.copy(), absmax.copy()
    with pytest.raises(error, match=match):
        dequantize_blockwise(q, absmax, code, 4)
    assert same_bits(q, q_before) and same_bits(absmax, absmax_before)


def test_bad_dequantize_input_is_rejected():
    code = dynamic_code(True, 3, symmetric=True)  # 7 values
    with pytest.raises(TypeError, match="uint8"):
        dequantize(np.zeros(3, np.int32), code)
    with pytest.raises(ValueError, match="index 7"):
        dequantize(np.array([0, 7], np.uint8), code)


@pytest.mark.parametrize("not_a_code", [dynamic_code().values, list(dynamic_code().values), None, "dynamic"])
def test_code_must_be_a_code(not_a_code):
    x = np.linspace(-1, 1, 8, dtype=np.float32)
    q = np.zeros(8, np.uint8)
    for call in (lambda: quantize(x, not_a_code), lambda: quantize_blockwise(x, not_a_code, 4),
                 lambda: dequantize(q, not_a_code),
                 lambda: dequantize_blockwise(q, np.ones(2, np.float32), not_a_code, 4)):
        with pytest.raises(TypeError, match="Code"):
            call()


# --- nothing is half-written -------------------------------------------------------------------

@_settings(EX_UNCHANGED)
@given(blockwise_cases(), st.data())
def test_inputs_are_never_modified_and_outputs_never_alias_them(case, data):
    """Every call, including those that raise, leaves its input arrays bit-for-bit unchanged, and
    no result shares memory with an input or with the code."""
    code, block_size, x = case
    noise = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).random(x.shape, dtype=np.float32)
    u = np.clip(x, -1, 1)
    x_nan = x.copy()
    x_nan.reshape(-1)[data.draw(st.integers(0, x.size - 1))] = np.nan
    inputs = [x, noise, u, x_nan]
    saved = [a.copy() for a in inputs]
    code_saved = [code.values.copy(), code.midpoints.copy(), code.floor_points.copy()]

    q, absmax = quantize_blockwise(x, code, block_size)
    for out in (q, absmax):
        for a in inputs + [code.values, code.midpoints, code.floor_points]:
            assert not np.shares_memory(out, a)
    inputs += [q, absmax]  # from here on, q and absmax are inputs too
    saved += [q.copy(), absmax.copy()]
    outputs = list(quantize_blockwise(x, code, block_size, noise=noise))
    outputs += [quantize(u, code), quantize(u, code, noise), dequantize(q, code),
                dequantize_blockwise(q, absmax, code, block_size)]
    outputs += list(quantize_blockwise(x.astype(np.float64), code, block_size))
    failing = [
        lambda: quantize_blockwise(x_nan, code, block_size),
        lambda: quantize(x_nan, code, noise),
        lambda: quantize_blockwise(x, code, 0),
        lambda: quantize_blockwise(x, code, block_size, noise=noise.reshape(-1)[:-1] if x.size > 1 else -noise - 1),
        lambda: quantize_blockwise(x, code, block_size, noise=noise.astype(np.float64)),
        lambda: dequantize_blockwise(q, absmax[:-1], code, block_size),
        lambda: dequantize_blockwise(q.astype(np.int64), absmax, code, block_size),
        lambda: dequantize_blockwise(q, -absmax - 1, code, block_size),
    ]
    for call in failing:
        with pytest.raises((ValueError, TypeError)):
            call()
    for a, b in zip(inputs, saved):
        assert same_bits(a, b)
    for a, b in zip([code.values, code.midpoints, code.floor_points], code_saved):
        assert same_bits(a, b)
    for out in outputs:
        for a in inputs + [code.values, code.midpoints, code.floor_points]:
            assert not np.shares_memory(out, a)
