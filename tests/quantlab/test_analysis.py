"""quantlab.analysis: known answers for the error tables, the outlier study and the captured Adam states."""
from __future__ import annotations

import math

import numpy as np
import pytest

from quantlab import analysis as A
from quantlab import dynamic_code, linear_code, metrics
from quantlab.codes import FAMILIES, family_codes

# --- data ---------------------------------------------------------------------------------------

def test_sample_data_is_reproducible_and_shaped():
    for name in A.DATA:
        x = A.sample_data(name, 1000, seed=3)
        assert x.dtype == np.float32 and x.shape == (1000,)
        assert np.array_equal(x, A.sample_data(name, 1000, seed=3))
        assert not np.array_equal(x, A.sample_data(name, 1000, seed=4))
    assert np.all(A.sample_data("adam_v", 1000) >= 0)
    assert np.any(A.sample_data("adam_m", 1000) < 0)
    # Adam's v: heavy-tailed gradients with scales over 4 decades, squared: well over 8 decades
    v = A.sample_data("adam_v", 4096)
    assert np.log10(v.max() / v[v > 0].min()) > 8
    with pytest.raises(ValueError, match="unknown data"):
        A.sample_data("uniform", 10)
    assert list(A.sample_datasets(10)) == list(A.DATA.values())


def test_adam_generator_is_shared_with_the_quantization_report():
    from experiments.studies import quantization_report

    data = quantization_report.datasets(2048)
    assert np.array_equal(data["Adam m"], A.sample_data("adam_m", 2048, seed=0))
    assert np.array_equal(data["Adam v"], A.sample_data("adam_v", 2048, seed=0))
    m, _ = A.adam_moments(2048)
    m[:] = 0  # the cached arrays are not handed out
    assert np.any(A.adam_moments(2048)[0])


# --- error tables --------------------------------------------------------------------------------------

def test_a_code_holding_every_value_of_the_data_is_exact():
    code = linear_code(4)
    # every code value, times a power of two (so x / absmax is exact in float32), shuffled and repeated
    x = np.random.default_rng(0).permutation(np.tile(code.values * np.float32(4.0), 8))
    rows = A.error_table({"exact": x}, {"linear4": code, "dynamic8": dynamic_code()}, ["tensor"])
    exact = A.select(rows, code="linear4")[0]
    assert exact["relative_error"] == 0 and exact["max_abs_error"] == 0 and exact["zero_rounding_fraction"] == 0
    assert A.value(rows, "relative_error", code="dynamic8") > 0  # the 8-bit map lacks most of those values


def test_tensor_block_is_one_block_of_n():
    x = A.sample_data("t2", 3000)
    rows = A.error_table({"x": x}, family_codes(6), [3000, "tensor", 5000])
    for code in FAMILIES:
        n_block, tensor, bigger = A.select(rows, code=code)
        for key in metrics.DEFAULT_MEASURES:
            assert n_block[key] == tensor[key] == bigger[key]
    assert {r["block_size"] for r in rows} == {3000, "tensor", 5000}


def test_blockwise_max_error_obeys_the_linear_code_bound():
    x = A.sample_data("normal", 1 << 14)
    code = linear_code(8)  # 255 values, spacing 2 / 254: error <= absmax(block) / 254
    for block_size in (64, 1024, "tensor"):
        x_hat = A.roundtrip(x, code, block_size)
        b = A.resolve_block_size(block_size, x.size)
        absmax = np.repeat(np.abs(x).reshape(-1, b).max(axis=1), b)
        assert np.all(np.abs(x - x_hat) <= absmax / 254 * (1 + 1e-6))
    rows = A.error_table({"x": x}, {"linear": code}, [64, 1024, "tensor"])
    errors = [r["relative_error"] for r in rows]
    assert errors[0] < errors[1] < errors[2]  # smaller blocks, smaller absmax, smaller steps


def test_error_table_quantizes_each_part_on_its_own():
    rng = np.random.default_rng(1)
    small, large = rng.standard_normal(1000).astype(np.float32), 1e6 * rng.standard_normal(500).astype(np.float32)
    code = linear_code(8)
    pooled = A.error_table({"states": {"a": small, "b": large}}, {"c": code}, ["tensor"])[0]
    by_hand = np.concatenate([A.roundtrip(small, code, "tensor"), A.roundtrip(large, code, "tensor")])
    expected = metrics.error_measures(np.concatenate([small, large]), by_hand)
    assert pooled["n"] == 1500
    for key in metrics.DEFAULT_MEASURES:
        assert pooled[key] == expected[key]
    one_tensor = A.error_table({"states": np.concatenate([small, large])}, {"c": code}, ["tensor"])[0]
    assert one_tensor["zero_rounding_fraction"] > 0.5 > pooled["zero_rounding_fraction"]


def test_a_tiny_value_rounds_to_zero_tensor_wise_but_not_in_its_own_block():
    x = np.array([1.0, 1e-9, 0.0, 0.5], np.float32)
    assert metrics.zero_rounding_fraction(x, A.roundtrip(x, dynamic_code(), "tensor")) == pytest.approx(1 / 3)
    assert metrics.zero_rounding_fraction(x, A.roundtrip(x, dynamic_code(), 1)) == 0  # own absmax: exact
    zeros = np.zeros(4, np.float32)
    assert math.isnan(metrics.zero_rounding_fraction(zeros, A.roundtrip(zeros, dynamic_code(), 2)))


def test_bit_sweep_error_falls_with_every_bit():
    rows = A.bit_sweep({"x": A.sample_data("normal", 1 << 13)}, bits=(3, 4, 5, 6, 7, 8), families=("dynamic", "linear"))
    for family in ("dynamic", "linear"):
        errors = [r["relative_error"] for r in A.select(rows, code=family)]
        assert len(errors) == 6 and all(a > b for a, b in zip(errors, errors[1:]))


def test_select_and_value():
    rows = [{"a": 1, "b": 0.5}, {"a": 2, "b": 0.25}]
    assert A.value(rows, "b", a=2) == 0.25
    with pytest.raises(LookupError):
        A.value(rows, "b", a=3)
    with pytest.raises(LookupError):
        A.value(rows + rows, "b", a=1)


# --- outliers -------------------------------------------------------------------------------------------

def test_insert_outliers():
    x = A.sample_data("normal", 1000)
    y, is_outlier = A.insert_outliers(x, 100, 10, "one per block", seed=1)
    assert is_outlier.reshape(10, 100).sum(axis=1).tolist() == [1] * 10
    assert np.all(y[is_outlier] == np.float32(10 * np.abs(x).max()))
    assert np.array_equal(y[~is_outlier], x[~is_outlier])
    one, mask = A.insert_outliers(x, 100, 10, "one per tensor", seed=1)
    assert mask.sum() == 1
    assert np.array_equal(mask, A.insert_outliers(x, 250, 10, "one per tensor", seed=1)[1])
    with pytest.raises(ValueError, match="placement"):
        A.insert_outliers(x, 100, 10, "everywhere")


def test_one_outlier_per_tensor_only_changes_its_own_block():
    x, code, b = A.sample_data("normal", 4096), dynamic_code(), 256
    y, is_outlier = A.insert_outliers(x, b, 1000, "one per tensor", seed=2)
    hit = np.flatnonzero(is_outlier)[0] // b
    blocks = np.arange(x.size) // b
    clean, with_outlier = A.roundtrip(x, code, b), A.roundtrip(y, code, b)
    # every other block: bit-identical to quantizing without the outlier
    assert np.array_equal(with_outlier[blocks != hit], clean[blocks != hit])
    # the outlier's block: its absmax is the tensor's, so it is quantized exactly as tensor-wise
    assert np.array_equal(with_outlier[blocks == hit], A.roundtrip(y, code, "tensor")[blocks == hit])
    assert not np.array_equal(with_outlier[blocks == hit], clean[blocks == hit])


def test_one_equal_outlier_per_block_makes_blockwise_equal_tensorwise():
    x, code = A.sample_data("t2", 4096), linear_code(8)
    y, _ = A.insert_outliers(x, 128, 50, "one per block", seed=0)
    assert np.array_equal(A.roundtrip(y, code, 128), A.roundtrip(y, code, "tensor"))


def test_outlier_study_rows():
    x = A.sample_data("normal", 1 << 14)
    rows = A.outlier_study(x, linear_code(8), block_sizes=(64, 1024), magnitudes=(1, 100))
    assert len(rows) == 2 * 2 * 2
    for r in A.select(rows, placement="one per block"):
        assert r["blockwise_error"] == r["tensorwise_error"]  # every block's absmax is the outlier
        assert r["affected_fraction"] == 1.0 and r["outliers"] == x.size // r["block_size"]
    for r in A.select(rows, placement="one per tensor"):
        assert r["outliers"] == 1
        assert r["affected_fraction"] == pytest.approx((r["block_size"] - 1) / (x.size - 1))
        # the damage is confined to one block: the mixture estimate holds
        assert r["blockwise_error"] == pytest.approx(r["confined_estimate"], rel=0.2)
    big = A.select(rows, placement="one per tensor", magnitude=100)
    for r in big:
        assert r["clean_blockwise_error"] < r["blockwise_error"] < r["tensorwise_error"]
        # 255 linear levels over 100x the data's range: |x| < max|x| / 2.54 rounds to 0, most of a normal
        assert r["tensorwise_zero_rounding"] > 0.8


# --- Adam states --------------------------------------------------------------------------------------

def _tiny_problem():
    import torch

    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((64, 5)).astype(np.float32)
    targets = rng.integers(0, 3, 64)
    return (lambda: torch.nn.Linear(5, 3)), A.minibatches(inputs, targets, 16, seed=0)


@pytest.mark.parametrize("optimizer", ["quantlab", "torch"])
def test_captured_states_follow_the_adam_recurrence(optimizer):
    import torch

    model_fn, data_fn = _tiny_problem()
    lr, (b1, b2), eps = 1e-2, (0.9, 0.999), 1e-8
    states = A.capture_adam_states(model_fn, data_fn, steps=2, seed=5, snapshot_steps=[1, 2], optimizer=optimizer,
                                   lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0)
    assert states.steps == [1, 2] and len(states.losses) == 2
    # the recurrence by hand, in float64, from the same initial weights and batches
    torch.manual_seed(5)
    model = model_fn().double()
    m = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for t in (1, 2):
        inputs, targets = data_fn(t)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs.double()), targets).backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                m[name] = b1 * m[name] + (1 - b1) * p.grad
                v[name] = b2 * v[name] + (1 - b2) * p.grad**2
                p -= lr * (m[name] / (1 - b1**t)) / ((v[name] / (1 - b2**t)).sqrt() + eps)
                assert np.all(states.v[name][t - 1] >= 0)
                np.testing.assert_allclose(states.m[name][t - 1], m[name].numpy(), rtol=1e-4, atol=1e-9)
                np.testing.assert_allclose(states.v[name][t - 1], v[name].numpy(), rtol=1e-4, atol=1e-12)
    assert states.flat("m").size == 5 * 3 + 3
    summary = states.summary()
    assert [(r["step"], r["state"], r["tensor"]) for r in summary[:3]] == [(1, "m", "weight"), (1, "m", "bias"),
                                                                           (1, "v", "weight")]
    assert set(states.tensors("v", 0)) == {"weight", "bias"}


def test_capture_checks_its_arguments():
    model_fn, data_fn = _tiny_problem()
    with pytest.raises(ValueError, match="snapshot_steps"):
        A.capture_adam_states(model_fn, data_fn, steps=2, snapshot_steps=[3])
    with pytest.raises(ValueError, match="optimizer"):
        A.capture_adam_states(model_fn, data_fn, steps=1, optimizer="sgd")


def test_distribution_summary():
    rows = A.distribution_summary({"a": np.array([0.0, 1e-6, -1e-2, 1.0])})
    assert rows[0]["zero_fraction"] == 0.25 and rows[0]["max_abs"] == 1.0
    assert rows[0]["decades"] == pytest.approx(6)


def test_adam_update_error_known_answers():
    # states the codes hold exactly: no error
    m = np.tile(linear_code(4).values * np.float32(0.5), 16)  # 15 values
    v = np.tile(linear_code(4, signed=False).values * np.float32(0.25), 15)  # 16 values
    exact = A.adam_update_error(m, v, linear_code(4), linear_code(4, signed=False), "tensor", step=3)
    assert exact["relative_error"] == exact["blown_up_fraction"] == exact["v_zero_rounding"] == 0.0
    assert math.isnan(exact["blown_up_with_v_lost"])
    # a tiny non-zero v that rounds to 0 turns its update into m / eps
    m, v = np.array([1.0, 1e-6], np.float32), np.array([1.0, 1e-12], np.float32)
    got = A.adam_update_error(m, v, dynamic_code(True), dynamic_code(False), "tensor")
    assert got["v_zero_rounding"] == 0.5 and got["blown_up_fraction"] == 0.5 and got["relative_error"] > 1
    assert got["blown_up_with_v_lost"] == 1.0
    # ... unless a gradient large enough to dominate the lost history arrives first:
    # v' = b2 * 0 + (1 - b2) g^2 is then close to the exact v'
    g = np.array([0.0, 1e-3], np.float32)
    nxt = A.adam_update_error(m, v, dynamic_code(True), dynamic_code(False), "tensor", grad=g, step=10)
    assert nxt["blown_up_fraction"] == 0 and nxt["relative_error"] < 1
    with pytest.raises(ValueError, match="same size"):
        A.adam_update_error(m, v[:1], dynamic_code(True), dynamic_code(False))


def test_update_error_table_uses_the_recorded_next_gradient():
    model_fn, data_fn = _tiny_problem()
    states = A.capture_adam_states(model_fn, data_fn, steps=3, snapshot_steps=[2, 3])
    assert [len(states.next_grad["weight"])] * 2 == [2, len(states.m["weight"])]
    rows = A.update_error_table(states, dynamic_code(True), dynamic_code(False), [4, "tensor"])
    assert len(rows) == 2 * 2 * 2  # steps x tensors x block sizes
    by_hand = A.adam_update_error(states.m["bias"][0], states.v["bias"][0], dynamic_code(True), dynamic_code(False),
                                  4, states.next_grad["bias"][0], 2)
    assert A.value(rows, "relative_error", step=2, tensor="bias", block_size=4) == by_hand["relative_error"]
