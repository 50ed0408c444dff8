"""Tests for quantlab.codes: the shipped codes and the Code invariants (docs/design.md section 2)."""
from __future__ import annotations

import pickle
from fractions import Fraction

import numpy as np
import pytest

from quantlab.codes import (
    FAMILIES,
    MAX_BITS,
    MIN_BITS,
    Code,
    dynamic_code,
    family_codes,
    float_code,
    fp8_code,
    linear_code,
    make_code,
    quantile_code,
)

BITS = range(MIN_BITS, MAX_BITS + 1)

_rng = np.random.default_rng(20240601)
SAMPLES = {
    "normal": _rng.standard_normal(100_000),
    "heavy": _rng.standard_t(2, 100_000),  # Student t, 2 degrees of freedom: infinite variance
    "nonneg": _rng.exponential(1.0, 100_000),
}

# (id, code, expected length) for every shipped code.
CASES = (
    [(f"dynamic{b}-signed", dynamic_code(True, b), 2**b) for b in BITS]
    + [(f"dynamic{b}-unsigned", dynamic_code(False, b), 2**b) for b in BITS]
    + [(f"dynamic{b}-symmetric", dynamic_code(True, b, symmetric=True), 2**b - 1) for b in BITS]
    + [(f"linear{b}-signed", linear_code(b, signed=True), 2**b - 1) for b in BITS]
    + [(f"linear{b}-unsigned", linear_code(b, signed=False), 2**b) for b in BITS]
    + [("fp8-e4m3", fp8_code("e4m3"), 253), ("fp8-e5m2", fp8_code("e5m2"), 247)]
    # 2**(bits-1) magnitudes and their negatives, +-0 merged; signed 8-bit is fp8 e4m3 (NaN pattern reserved)
    + [(f"float{b}-signed", float_code(b), 2**b - 1 if b < 8 else 253) for b in BITS]
    + [(f"float{b}-unsigned", float_code(b, signed=False), 2**b) for b in BITS]
    # A continuous sample has 2**bits distinct quantiles, none of them merged.
    + [(f"quantile{b}-{s}", quantile_code(SAMPLES[s], b), 2**b) for s in SAMPLES for b in BITS]
)
IDS = [c[0] for c in CASES]
CODES = [c[1] for c in CASES]


@pytest.mark.parametrize("name, code, length", CASES, ids=IDS)
def test_length_dtype_and_order(name, code, length):
    v = code.values
    assert len(code) == v.size == length
    assert v.ndim == 1
    assert v.dtype == np.float32
    assert np.all(v[1:] > v[:-1]), "values must be strictly increasing (sorted and unique)"
    assert np.unique(v).size == v.size
    assert v.size <= 2**code.bits


@pytest.mark.parametrize("code", CODES, ids=IDS)
def test_values_in_range_and_zero_is_positive(code):
    v = code.values
    assert np.all(np.isfinite(v))
    assert np.all((v >= -1.0) & (v <= 1.0))
    zeros = np.flatnonzero(v == 0.0)
    assert zeros.size == 1
    assert not np.signbit(v[zeros[0]]), "the zero of a code must be +0.0, not -0.0"
    assert code.zero_index == zeros[0]
    assert not np.any(np.signbit(v) & (v == 0))


@pytest.mark.parametrize("bits", BITS)
def test_dynamic_signed_endpoints(bits):
    v = dynamic_code(True, bits).values
    assert v[-1] == 1.0
    assert -1.0 not in v
    # bitsandbytes layout: the negatives mirror the positives below 1.0.
    assert np.array_equal(v[v < 0], -v[(v > 0) & (v < 1)][::-1])
    assert dynamic_code(True, bits).signed


def test_dynamic_signed_8bit_minimum_is_bitsandbytes_value():
    v = dynamic_code(True, 8).values
    # top decade, 64 intervals of linspace(0.1, 1, 65): last midpoint 1 - 0.9 / 128 = 0.99296875
    assert v[0] == np.float32(-0.99296875)
    assert v[-1] == 1.0
    assert -1.0 not in v


@pytest.mark.parametrize("bits", BITS)
def test_dynamic_unsigned_endpoints(bits):
    code = dynamic_code(False, bits)
    assert code.values[0] == 0.0 and not np.signbit(code.values[0])
    assert code.values[-1] == 1.0
    assert code.zero_index == 0
    assert not code.signed


@pytest.mark.parametrize("bits", BITS)
def test_dynamic_symmetric_endpoints_and_mirror(bits):
    v = dynamic_code(True, bits, symmetric=True).values
    assert v[0] == -1.0 and v[-1] == 1.0
    assert np.array_equal(v, -v[::-1])
    assert v[v.size // 2] == 0.0


@pytest.mark.parametrize("bits", BITS)
def test_linear_codes_are_evenly_spaced(bits):
    s = linear_code(bits, signed=True).values.astype(np.float64)
    u = linear_code(bits, signed=False).values.astype(np.float64)
    assert s[0] == -1.0 and s[-1] == 1.0
    assert u[0] == 0.0 and u[-1] == 1.0
    # each value is the float32 rounding of its exact grid point
    assert np.array_equal(s, np.float32(-1 + 2 * np.arange(s.size) / (s.size - 1)).astype(np.float64))
    assert np.array_equal(u, np.float32(np.arange(u.size) / (u.size - 1)).astype(np.float64))


@pytest.mark.parametrize("s", SAMPLES)
@pytest.mark.parametrize("bits", BITS)
def test_quantile_code_endpoints(s, bits):
    v = quantile_code(SAMPLES[s], bits).values
    assert np.max(np.abs(v)) == 1.0, "quantiles are scaled by their largest magnitude"
    if s == "nonneg":
        assert v[0] == 0.0 and v[-1] == 1.0


def test_symmetric_requires_signed():
    with pytest.raises(ValueError, match="symmetric"):
        dynamic_code(False, 8, symmetric=True)


@pytest.mark.parametrize("bad", [1, 9, 0, -8, 2.5, True, "8", None])
def test_code_factories_reject_bad_bits(bad):
    for factory in (lambda: dynamic_code(True, bad), lambda: linear_code(bad),
                    lambda: quantile_code(SAMPLES["normal"], bad), lambda: float_code(bad)):
        with pytest.raises(ValueError, match="bits"):
            factory()


def test_fp8_rejects_unknown_format():
    with pytest.raises(ValueError, match="fp8 format"):
        fp8_code("e3m4")


# --- minifloats and code families ---------------------------------------------------------------

def test_float_code_known_formats():
    fp4 = float_code(4)  # OCP FP4 E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives
    magnitudes = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
    assert fp4.name == "float4-e2m1"
    assert np.array_equal(fp4.values, np.unique(np.concatenate([-magnitudes, magnitudes])).astype(np.float32))
    assert float_code(8) == fp8_code("e4m3")
    assert len(float_code(6)) == 63  # E3M2: 32 magnitudes, +-0 merged
    unsigned = float_code(8, signed=False)  # E4M4, no sign bit: 256 distinct values
    assert unsigned.name == "float8-e4m4-unsigned" and len(unsigned) == 256 and unsigned.values[0] == 0
    with pytest.raises(ValueError, match="exponent bits"):
        float_code(4, exponent_bits=4)


def test_make_code_picks_signedness_from_the_data():
    v = SAMPLES["nonneg"]  # non-negative, as Adam's v
    m = SAMPLES["heavy"]
    assert make_code("dynamic", 8, v) == dynamic_code(signed=False)
    assert make_code("dynamic", 8, m) == dynamic_code(signed=True)
    assert make_code("dynamic-symmetric", 8, v) is None
    assert make_code("linear", 5, m) == linear_code(5, signed=True)
    assert make_code("float", 4, v).name == "float4-e2m2-unsigned"
    assert make_code("quantile", 4, m).bits == 4
    with pytest.raises(ValueError, match="needs a sample"):
        make_code("quantile", 8)
    with pytest.raises(ValueError, match="unknown code family"):
        make_code("nf4")


def test_family_codes_choose_each_code_for_the_data():
    v, m = SAMPLES["nonneg"], SAMPLES["heavy"]
    choose = family_codes(6)
    assert tuple(choose) == FAMILIES
    for family, code_for in choose.items():
        assert code_for(v) == make_code(family, 6, v) and code_for(m) == make_code(family, 6, m)
    assert choose["quantile"](v) == quantile_code(v, 6) != choose["quantile"](m)
    assert list(family_codes(3, ["linear"])) == ["linear"]


# --- immutability, equality, hashing, pickling -------------------------------------------------

@pytest.mark.parametrize("code", CODES, ids=IDS)
def test_arrays_are_read_only(code):
    for arr in (code.values, code.midpoints, code.floor_points):
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 0.5


def test_attributes_cannot_be_set_or_deleted():
    code = dynamic_code()
    for attr in ("values", "name", "bits", "midpoints", "floor_points", "zero_index", "new_attribute"):
        with pytest.raises(AttributeError):
            setattr(code, attr, None)
    for attr in ("values", "name", "bits", "midpoints", "zero_index"):
        with pytest.raises(AttributeError):
            delattr(code, attr)
    assert code == dynamic_code() and code.name == "dynamic8-signed"


def test_code_copies_its_input():
    source = np.array([-0.5, 0.0, 0.5], np.float32)
    code = Code(source)
    source[0] = -1.0
    assert code.values[0] == np.float32(-0.5)


@pytest.mark.parametrize("code", CODES, ids=IDS)
def test_equality_and_hash_by_value(code):
    twin = Code(code.values.copy(), name="another name", bits=code.bits)
    assert twin == code and code == twin
    assert hash(twin) == hash(code)
    assert len({code, twin}) == 1
    assert code != code.values  # not equal to a bare array
    if code.bits < MAX_BITS:
        assert Code(code.values.copy(), bits=code.bits + 1) != code  # bits are part of the identity
    changed = code.values.copy()
    changed[-1] = np.nextafter(changed[-1], np.float32(0))
    assert Code(changed, bits=code.bits) != code


def test_codes_are_equal_exactly_when_values_and_bits_are():
    # (dynamic2-symmetric and linear2-signed are both [-1, 0, 1] in 2 bits, hence equal)
    for a in CODES:
        for b in CODES:
            same = a.bits == b.bits and np.array_equal(a.values.view(np.uint32), b.values.view(np.uint32))
            assert (a == b) is same
            if same:
                assert hash(a) == hash(b)


@pytest.mark.parametrize("code", CODES, ids=IDS)
def test_pickle_round_trip(code):
    back = pickle.loads(pickle.dumps(code))
    assert back == code and hash(back) == hash(code)
    assert back.name == code.name and back.bits == code.bits and back.zero_index == code.zero_index
    assert np.array_equal(back.values.view(np.uint32), code.values.view(np.uint32))
    assert np.array_equal(back.midpoints.view(np.uint32), code.midpoints.view(np.uint32))
    assert not back.values.flags.writeable


# --- decision points ---------------------------------------------------------------------------

@pytest.mark.parametrize("code", CODES, ids=IDS)
def test_midpoints_are_exact_midpoints_rounded_down(code):
    v, mid = code.values, code.midpoints
    assert mid.dtype == np.float32 and mid.shape == (v.size - 1,)
    for i in range(v.size - 1):
        exact = (Fraction(float(v[i])) + Fraction(float(v[i + 1]))) / 2
        m = mid[i]
        above = np.nextafter(m, np.float32(np.inf))
        assert Fraction(float(m)) <= exact < Fraction(float(above)), (i, v[i], v[i + 1], m)
        assert v[i] <= m < v[i + 1]


@pytest.mark.parametrize("code", CODES, ids=IDS)
def test_floor_points(code):
    expected = np.nextafter(code.values[1:], np.float32(-np.inf))
    assert code.floor_points.dtype == np.float32
    assert np.array_equal(code.floor_points.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("code", CODES, ids=IDS)
def test_relative_gaps_far_above_float32_precision(code):
    # Several reference properties (re-quantizing a reconstruction gives the same index) rely on
    # neighbouring values being much further apart than a few float32 ulps.
    v = code.values.astype(np.float64)
    gap = np.diff(v)
    scale = np.maximum(np.abs(v[:-1]), np.abs(v[1:]))
    assert np.min(gap / scale) > 2.0**-16


# --- fp8 against torch -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, dtype_name", [("e4m3", "float8_e4m3fn"), ("e5m2", "float8_e5m2")])
def test_fp8_codes_equal_torch_float8(fmt, dtype_name):
    torch = pytest.importorskip("torch")
    all_patterns = torch.arange(256, dtype=torch.uint8).view(getattr(torch, dtype_name)).float()
    finite = torch.unique(all_patterns[torch.isfinite(all_patterns)])  # merges +0 and -0
    expected = (finite / finite.max()).numpy().astype(np.float32)
    expected = expected + np.float32(0.0)  # torch.unique may keep -0.0; a code stores +0.0
    assert np.array_equal(expected.view(np.uint32), fp8_code(fmt).values.view(np.uint32))


# --- quantile codes ----------------------------------------------------------------------------

def test_quantile_code_of_large_normal_sample_is_roughly_symmetric():
    sample = np.random.default_rng(7).standard_normal(1_000_000)
    v = quantile_code(sample, 8).values
    assert 0.0 in v
    pos = v[v > 0]
    neg = np.sort(-v[v < 0])
    # 256 quantiles, 128 on each side; the one nearest zero became 0.0
    assert {pos.size, neg.size} == {127, 128}
    m = min(pos.size, neg.size)
    # The standard error of the most extreme quantile (p = 1/512, n = 1e6) is about 0.007 in
    # sample units, 0.0025 after scaling by ~2.9; 0.02 is 8 standard errors.
    assert np.max(np.abs(pos[-m:] - neg[-m:])) < 0.02


def test_quantile_code_replaces_value_nearest_zero_by_zero():
    sample = np.random.default_rng(3).standard_normal(10_001) + 0.01
    code = quantile_code(sample, 4)
    assert code.values[code.zero_index] == 0.0
    assert len(code) == 16


def test_quantile_code_offset_zero_uses_extremes():
    sample = np.array([-4.0, -1.0, 0.0, 1.0, 2.0])
    v = quantile_code(sample, 2, offset=0.0).values
    assert v[0] == -1.0 and v[-1] == np.float32(0.5)  # min / max|x| and max / max|x|


@pytest.mark.parametrize("sample, kwargs, match", [
    ([], {}, "non-empty"),
    (np.zeros((0, 3)), {}, "non-empty"),
    ([0.1, np.nan, 0.3], {}, "NaN"),
    ([0.1, np.inf, 0.3], {}, "Inf"),
    (np.zeros(1000), {}, "all zero"),
    (np.full(1000, 3.0), {}, "distinct"),
    (np.arange(10.0), {"offset": -0.1}, "offset"),
    (np.arange(10.0), {"offset": 0.5}, "offset"),
    (np.arange(10.0), {"offset": 1.0}, "offset"),
    (np.arange(10.0), {"bits": 1}, "bits"),
    (np.arange(10.0), {"bits": 9}, "bits"),
])
def test_quantile_code_rejects_bad_input(sample, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantile_code(sample, **kwargs)


# --- constructor validation --------------------------------------------------------------------

@pytest.mark.parametrize("values, kwargs, match", [
    ([0.0, 0.5, -0.5], {}, "sorted"),
    ([-0.5, 0.0, 0.5, 0.5], {}, "unique"),
    # distinct in float64, equal after rounding to float32
    (np.array([-0.5, 0.0, 0.5, 0.5 + 1e-12]), {}, "unique"),
    ([-0.0, 0.0, 0.5], {}, "unique"),
    ([-1.5, 0.0, 0.5], {}, r"\[-1, 1\]"),
    ([0.0, 0.5, 1.0000001], {}, r"\[-1, 1\]"),
    ([-0.5, 0.0, np.nan], {}, "finite"),
    ([-np.inf, 0.0, 0.5], {}, "finite"),
    ([-0.5, 0.25, 0.5], {}, "0.0"),
    ([[-0.5, 0.0], [0.5, 1.0]], {}, "one-dimensional"),
    (0.0, {}, "one-dimensional"),
    ([0.0], {}, "at least 2"),
    (np.linspace(-1, 1, 5), {"bits": 2}, "do not fit in 2 bits"),
    (np.linspace(-1, 1, 257), {}, "bits"),
    ([-0.5, 0.0, 0.5], {"bits": 1}, "bits"),
    ([-0.5, 0.0, 0.5], {"bits": 9}, "bits"),
    ([-0.5, 0.0, 0.5], {"bits": True}, "bits"),
    # 2**2.5 > 5, but a fractional bit width is not a bit width
    (np.linspace(-1, 1, 5), {"bits": 2.5}, "bits"),
])
def test_code_constructor_rejects(values, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Code(values, **kwargs)


def test_code_constructor_stores_positive_zero_and_infers_bits():
    code = Code([-1.0, -0.0, 0.25, 1.0])
    assert code.zero_index == 1 and not np.signbit(code.values[1])
    assert code.bits == 2
    assert Code(np.linspace(-1, 1, 17)).bits == 5
    assert Code([0.0, 1.0]).bits == MIN_BITS
