"""Tests for quantlab.metrics on small examples worked out from the formulas."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from quantlab import metrics, reference
from quantlab.codes import dynamic_code, linear_code


def test_two_element_example():
    x, x_hat = [1.0, 2.0], [1.0, 1.0]
    # errors (0, 1): mean |e| = 1/2, rms = sqrt(1/2), ||e|| / ||x|| = 1 / sqrt(1 + 4)
    assert metrics.mean_absolute_error(x, x_hat) == 0.5
    assert metrics.rms_error(x, x_hat) == pytest.approx(math.sqrt(0.5), rel=1e-15)
    assert metrics.relative_error(x, x_hat) == pytest.approx(1 / math.sqrt(5), rel=1e-15)


def test_signed_example_and_symmetry():
    x = np.array([3.0, -4.0, 0.0, 1.0])
    x_hat = np.array([2.0, -2.0, 1.0, 1.0])
    # errors (1, -2, -1, 0): sum |e| = 4, sum e^2 = 6, ||x||^2 = 26
    assert metrics.mean_absolute_error(x, x_hat) == 1.0
    assert metrics.rms_error(x, x_hat) == pytest.approx(math.sqrt(6 / 4), rel=1e-15)
    assert metrics.relative_error(x, x_hat) == pytest.approx(math.sqrt(6 / 26), rel=1e-15)
    assert metrics.mean_absolute_error(x_hat, x) == 1.0
    assert metrics.rms_error(x_hat, x) == metrics.rms_error(x, x_hat)


def test_perfect_reconstruction_and_zero_cases():
    x = np.array([0.5, -0.25, 8.0], np.float32)
    assert metrics.mean_absolute_error(x, x) == 0.0
    assert metrics.rms_error(x, x) == 0.0
    assert metrics.relative_error(x, x) == 0.0
    # ||x|| = 0: defined as 0 when x_hat is 0 too, inf otherwise
    assert metrics.relative_error([0.0, 0.0], [0.0, -0.0]) == 0.0
    assert metrics.relative_error([0.0, 0.0], [0.0, 1e-30]) == math.inf


def test_measures_are_computed_in_float64_and_flatten():
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    x_hat = (x + np.float32(2.0**-20)).ravel()  # any shape with the same number of elements
    assert metrics.mean_absolute_error(x, x_hat) == 2.0**-20
    assert metrics.rms_error(x, x_hat) == 2.0**-20
    assert isinstance(metrics.rms_error(x, x_hat), float)


def test_max_errors_by_hand():
    x, x_hat = np.array([3.0, -4.0, 0.5]), np.array([2.0, -2.5, 0.5])
    # errors (1, -1.5, 0): max |e| = 1.5, max |x| = 4
    assert metrics.max_abs_error(x, x_hat) == 1.5
    assert metrics.max_relative_error(x, x_hat) == 1.5 / 4
    assert metrics.max_relative_error(x, x) == 0.0
    # max |x| = 0: 0 when x_hat is 0 too, inf otherwise (as relative_error)
    assert metrics.max_relative_error([0.0, 0.0], [-0.0, 0.0]) == 0.0
    assert metrics.max_relative_error([0.0, 0.0], [0.0, 1e-30]) == math.inf


def test_error_measures_worked_example():
    x, x_hat = np.array([3.0, -4.0, 1e-3, 0.0]), np.array([2.0, -2.0, 0.0, 0.0])
    got = metrics.error_measures(x, x_hat, metrics.MEASURES)
    assert list(got) == list(metrics.MEASURES)
    # errors (1, -2, 1e-3, 0)
    assert got["mean_absolute_error"] == pytest.approx((3 + 1e-3) / 4, rel=1e-12)
    assert got["relative_error"] == pytest.approx(math.sqrt(5 + 1e-6) / math.sqrt(25 + 1e-6), rel=1e-12)
    assert got["rms_error"] == pytest.approx(math.sqrt((5 + 1e-6) / 4), rel=1e-12)
    assert got["max_abs_error"] == 2.0
    assert got["max_relative_error"] == 0.5
    assert got["zero_rounding_fraction"] == pytest.approx(1 / 3)  # 1e-3 of the three non-zeros
    with pytest.raises(ValueError, match="unknown error measures"):
        metrics.error_measures(x, x_hat, ["psnr"])


def test_error_measures_equal_the_single_measures():
    rng = np.random.default_rng(7)
    x = rng.standard_t(3, 999).astype(np.float32)
    x_hat = np.where(np.abs(x) < 0.1, 0, x + rng.standard_normal(999).astype(np.float32) * 0.01)
    got = metrics.error_measures(x, x_hat, metrics.MEASURES)
    for name in metrics.MEASURES:
        measure = getattr(metrics, name)
        assert list(inspect.signature(measure).parameters) == ["x", "x_hat"], name
        assert got[name] == measure(x, x_hat), name
    assert 0 < got["zero_rounding_fraction"] < 1
    assert metrics.error_measures(x, x_hat) == {name: got[name] for name in metrics.DEFAULT_MEASURES}
    assert metrics.error_measures(x, x_hat, ["rms_error"]) == {"rms_error": got["rms_error"]}


def per_block_rms_loop(x, x_hat, block_size):
    x, x_hat = np.ravel(x).astype(np.float64), np.ravel(x_hat).astype(np.float64)
    out = []
    for start in range(0, x.size, block_size):
        err = x[start:start + block_size] - x_hat[start:start + block_size]
        out.append(math.sqrt(sum(e * e for e in err) / err.size))
    return np.array(out)


@pytest.mark.parametrize("n, block_size", [(10, 4), (12, 4), (7, 1), (5, 100), (1000, 64), (1001, 256)])
def test_per_block_rms_error_matches_a_loop(n, block_size):
    rng = np.random.default_rng(n + block_size)
    x = rng.standard_normal(n)
    x_hat = x + rng.standard_normal(n) * 0.01
    got = metrics.per_block_rms_error(x, x_hat, block_size)
    assert got.shape == (-(-n // block_size),)
    np.testing.assert_allclose(got, per_block_rms_loop(x, x_hat, block_size), rtol=1e-12, atol=0)


def test_per_block_rms_error_short_last_block_by_hand():
    x = [1.0, 1.0, 1.0, 1.0, 1.0]
    x_hat = [0.0, 1.0, 1.0, 1.0, 3.0]
    # blocks of 2: errors (1, 0), (0, 0), (-2): rms sqrt(1/2), 0, 2 (the last block has 1 element)
    got = metrics.per_block_rms_error(x, x_hat, 2)
    np.testing.assert_allclose(got, [math.sqrt(0.5), 0.0, 2.0], rtol=1e-15)


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True])
def test_per_block_rms_error_rejects_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        metrics.per_block_rms_error([1.0, 2.0], [1.0, 2.0], block_size)


def test_code_usage_counts_indices():
    code = linear_code(2)  # 3 values
    q = np.array([[0, 2, 2], [2, 1, 2]], np.uint8)
    usage = metrics.code_usage(q, code)
    assert usage.tolist() == [1, 1, 4]
    assert usage.sum() == q.size


def test_code_usage_matches_unique_counts():
    code = dynamic_code()
    x = np.random.default_rng(0).standard_t(3, 5000).astype(np.float32)
    q, _ = reference.quantize_blockwise(x, code, 256)
    usage = metrics.code_usage(q, code)
    assert usage.shape == (256,) and usage.sum() == q.size
    idx, counts = np.unique(q, return_counts=True)
    assert np.array_equal(usage[idx], counts)
    assert np.count_nonzero(usage) == idx.size


def test_code_usage_rejects_bad_indices():
    code = dynamic_code(True, 3, symmetric=True)  # 7 values
    with pytest.raises(ValueError, match="index 7"):
        metrics.code_usage(np.array([7], np.uint8), code)
    with pytest.raises(TypeError, match="uint8"):
        metrics.code_usage(np.array([1], np.int64), code)
    with pytest.raises(TypeError, match="Code"):
        metrics.code_usage(np.array([1], np.uint8), code.values)


def test_zero_rounding_fraction():
    x = [0.0, 1.0, 2.0, -3.0, 0.0]
    x_hat = [0.0, 0.0, 2.0, -0.0, 5.0]
    # non-zero x: 1, 2, -3; of these 1 and -3 became (+/-)0 -> 2 / 3; zeros of x are not counted
    assert metrics.zero_rounding_fraction(x, x_hat) == pytest.approx(2 / 3, rel=1e-15)
    assert metrics.zero_rounding_fraction([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert math.isnan(metrics.zero_rounding_fraction([0.0, -0.0], [1.0, 0.0]))


def test_blockwise_error_summary_is_consistent_with_the_measures():
    code = dynamic_code()
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(3000) * np.exp(rng.standard_normal(3000) * 3)).astype(np.float32)
    x[::50] = 0.0
    summary = metrics.blockwise_error_summary(x, code, 256)
    assert set(summary) == {"code", "block_size", "mean_absolute_error", "rms_error", "relative_error",
                            "max_block_rms_error", "zero_rounding_fraction", "codes_used"}
    q, absmax = reference.quantize_blockwise(x, code, 256)
    x_hat = reference.dequantize_blockwise(q, absmax, code, 256)
    assert summary["code"] == code.name and summary["block_size"] == 256
    assert summary["mean_absolute_error"] == metrics.mean_absolute_error(x, x_hat)
    assert summary["rms_error"] == metrics.rms_error(x, x_hat)
    assert summary["relative_error"] == metrics.relative_error(x, x_hat)
    assert summary["max_block_rms_error"] == pytest.approx(max(per_block_rms_loop(x, x_hat, 256)), rel=1e-12)
    assert summary["zero_rounding_fraction"] == metrics.zero_rounding_fraction(x, x_hat)
    assert summary["codes_used"] == np.unique(q).size
    # the overall mean squared error is a count-weighted mean of the blocks' mean squared errors
    assert summary["max_block_rms_error"] >= summary["rms_error"] * (1 - 1e-12)


@pytest.mark.parametrize("fn", [getattr(metrics, name) for name in metrics.MEASURES]
                         + [metrics.error_measures, lambda x, y: metrics.per_block_rms_error(x, y, 2)])
def test_shape_mismatch_and_empty_are_rejected(fn):
    with pytest.raises(ValueError, match="elements"):
        fn([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one element"):
        fn([], [])
