"""quantlab.reference and quantlab.codes below 8 bits, against independent statements written here:
zero-free codes (Li et al. 2023), packing as a loop over bits, rank-1 normalisation by brute force."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab import reference
from quantlab.codes import ZERO_FREE_FAMILIES, Code, dynamic_code, linear_code, make_code


def nearest_brute_force(u: np.ndarray, values: np.ndarray) -> np.ndarray:
    """argmin |values - u| in float64, ties to the lower index."""
    distance = np.abs(values.astype(np.float64)[None, :] - u.reshape(-1, 1).astype(np.float64))
    return np.argmin(distance, axis=1)


# --- zero-free codes ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(2, 9))
def test_zero_free_linear_code_is_li_et_al_map(bits):
    code = linear_code(bits, signed=False, include_zero=False)
    assert code.values.tolist() == [(i + 1) / 2**bits for i in range(2**bits)]
    assert code.zero_free and not code.signed and code.zero_index == 0 and code.bits == bits


@pytest.mark.parametrize("bits", range(2, 9))
def test_zero_free_dynamic_code_is_the_unsigned_dynamic_code_without_zero(bits):
    code, with_zero = dynamic_code(False, bits, include_zero=False), dynamic_code(False, bits)
    assert code.values.tolist() == with_zero.values[1:].tolist()
    assert code.zero_free and code.values[0] == pytest.approx(0.325 * 10.0 ** -(bits - 2))


def test_signed_zero_free_codes_are_refused():
    for make in (lambda: linear_code(4, signed=True, include_zero=False),
                 lambda: dynamic_code(True, 4, include_zero=False)):
        with pytest.raises(ValueError, match="include_zero=False is for unsigned codes"):
            make()
    with pytest.raises(ValueError, match="only a code of positive values may leave it out"):
        Code([-0.5, 0.5, 1.0])
    assert all(make_code(family, 4, signed=True) is None for family in ZERO_FREE_FAMILIES)
    assert make_code("linear-zero-free", 4, signed=False) == linear_code(4, False, include_zero=False)


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(2, 8), family=st.sampled_from(ZERO_FREE_FAMILIES), n=st.integers(1, 3000),
       block_size=st.sampled_from([1, 7, 128, 256]), seed=st.integers(0, 2**32 - 1))
def test_a_zero_free_code_stores_no_element_as_zero_unless_its_block_is(bits, family, n, block_size, seed):
    """The zero-point problem's fix: a non-negative block with absmax > 0 dequantizes to no 0, zeros
    included (they become the smallest value times absmax); an all-zero block stays 0."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 0, n)) ** 2
    x[rng.random(n) < 0.3] = 0
    x = x.astype(np.float32)
    code = make_code(family, bits, signed=False)
    q, absmax = reference.quantize_blockwise(x, code, block_size)
    values = reference.dequantize_blockwise(q, absmax, code, block_size)
    block_of = np.arange(n) // block_size
    assert np.all((values > 0) == (absmax[block_of] > 0))
    assert np.array_equal(q.reshape(-1), nearest_brute_force(np.divide(
        x, absmax[block_of], out=np.zeros_like(x), where=absmax[block_of] > 0), code.values))


# --- packing --------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1))
def test_packing_puts_index_i_at_its_bits_of_its_byte(bits, n, seed):
    q = np.random.default_rng(seed).integers(0, 2**bits, n).astype(np.uint8)
    packed = reference.pack_indices(q, bits)
    k = 8 // bits if bits in (2, 4) else 1
    assert packed.dtype == np.uint8 and packed.size == -(-n // k) == reference.packed_size(n, bits)
    expected = [0] * packed.size
    for i, index in enumerate(q.tolist()):
        expected[i // k] |= index << ((i % k) * bits)
    assert packed.tolist() == expected  # unused high bits of the last byte are 0
    assert np.array_equal(reference.unpack_indices(packed, bits, n), q)


def test_packing_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="does not fit in 4 bits"):
        reference.pack_indices(np.array([16], np.uint8), 4)
    with pytest.raises(ValueError, match="fill 3 bytes, got 2"):
        reference.unpack_indices(np.zeros(2, np.uint8), 4, 5)
    with pytest.raises(TypeError, match="uint8"):
        reference.pack_indices(np.array([1], np.int32), 4)


# --- rank-1 normalisation -------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(shape=st.sampled_from([(1, 5), (5, 1), (3, 4), (17, 9), (4, 3, 5), (2, 2, 2, 2)]),
       bits=st.integers(2, 8), signed=st.booleans(), zero_rows=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_rank1_divides_each_element_by_the_smaller_of_its_row_and_column_maxima(shape, bits, signed, zero_rows, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 2, shape)).astype(np.float32)
    x = x if signed else np.abs(x)
    if zero_rows:
        x[0] = 0
    code = dynamic_code(signed, bits) if signed else linear_code(bits, False, include_zero=False)
    q, row_max, col_max = reference.quantize_rank1(x, code)
    rows, cols = shape[0], int(np.prod(shape[1:]))
    matrix = x.reshape(rows, cols)
    for r in range(rows):
        assert row_max[r] == max(abs(float(v)) for v in matrix[r])
    for c in range(cols):
        assert col_max[c] == max(abs(float(v)) for v in matrix[:, c])
    scale = np.array([[min(row_max[r], col_max[c]) for c in range(cols)] for r in range(rows)], np.float32)
    assert np.all(np.abs(matrix) <= scale)  # so |u| <= 1: the search covers it
    u = np.divide(matrix, scale, out=np.zeros_like(matrix), where=scale > 0)
    assert q.shape == x.shape and np.array_equal(q.reshape(-1), nearest_brute_force(u, code.values))
    assert np.all(q.reshape(rows, cols)[scale == 0] == code.zero_index)
    values = reference.dequantize_rank1(q, row_max, col_max, code)
    assert np.array_equal(values.reshape(rows, cols), code.values[q.reshape(rows, cols)] * scale)


def test_rank1_is_exact_where_an_element_is_its_row_or_column_maximum():
    x = np.array([[4.0, 1.0], [2.0, 8.0]], np.float32)
    code = linear_code(4, False, include_zero=False)
    values = reference.dequantize_rank1(*reference.quantize_rank1(x, code), code)
    assert values[0, 0] == 4.0 and values[1, 1] == 8.0  # their own row and column maxima
    assert values[1, 0] == 2.0  # scale min(8, 4) = 4, and 2 / 4 = 8 / 16 is a code value
    assert values[0, 1] == pytest.approx(1.0, abs=1 / 32)  # scale min(4, 8) = 4: 1 / 4 in steps of 1 / 16


def test_rank1_refuses_vectors_and_mismatched_maxima():
    with pytest.raises(ValueError, match="2 or more dimensions"):
        reference.quantize_rank1(np.ones(5, np.float32), dynamic_code())
    with pytest.raises(ValueError, match="row_max has 2 entries, 3 are needed"):
        reference.dequantize_rank1(np.zeros((3, 2), np.uint8), np.ones(2, np.float32), np.ones(2, np.float32),
                                   dynamic_code())


def test_a_step_with_packed_states_is_the_step_with_unpacked_ones():
    """step_quantized's formats change storage only: packed or not, the same numbers."""
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal((2, 12, 10)).astype(np.float32)
    m, v = rng.standard_normal((12, 10)).astype(np.float32), rng.random((12, 10)).astype(np.float32)
    hyper = reference.adam_hyperparameters(1e-2, 0.9, 0.999, 1e-8, 0.0, False, 1)
    results = []
    for packed in (False, True):
        formats = [reference.Blockwise(dynamic_code(True, 4), 32, packed),
                   reference.Rank1(linear_code(4, False, include_zero=False), packed)]
        stored = [f.quantize(x) for f, x in zip(formats, (m, v))]
        new_p, new_states = reference.step_quantized(reference.adam_update, p, g, stored, formats, hyper)
        unpacked = [reference.unpack_indices(s[0], 4, 120) if packed else s[0].reshape(-1) for s in new_states]
        results.append((new_p, unpacked, [s[1:] for s in new_states]))
    (p0, q0, scales0), (p1, q1, scales1) = results
    assert np.array_equal(p0, p1) and all(np.array_equal(a, b) for a, b in zip(q0, q1))
    assert all(np.array_equal(a, b) for s0, s1 in zip(scales0, scales1) for a, b in zip(s0, s1))
