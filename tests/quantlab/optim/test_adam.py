"""quantlab.optim.Adam / AdamW as torch optimizers: agreement with torch.optim and bitsandbytes,
state layout, checkpoints, per-parameter options, the torch.optim API, non-finite gradients and
argument checks. CPU, float32 parameters (16-bit ones: test_16bit.py; CUDA: tests/cuda).

Measured numbers quoted in the comments are from torch 2.14.1 (CPU), bitsandbytes 0.50.2.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import quantlab.optim as qo
from helpers.kernels import assert_bits_equal, reference_adam_step_8bit
from helpers.optim import (
    assert_8bit_trains_like_32bit,
    assert_same_parameters_and_states,
    assert_same_snapshot,
    checkpoint_model,
    checkpoint_steps,
    dequantized,
    flat,
    layout,
    relative_deviation,
    run_fixed_gradients,
    run_single_tensor,
    snapshot,
    spread,
    state_tensors,
    ulps_apart,
)
from quantlab import reference
from quantlab.codes import dynamic_code, linear_code

EIGHT_BIT = {"exp_avg": 8, "exp_avg_sq": 8}
THIRTY_TWO_BIT = {"exp_avg": 32, "exp_avg_sq": 32}

OURS_AND_TORCH = [
    pytest.param(qo.Adam, torch.optim.Adam, 0.0, id="adam"),
    pytest.param(qo.Adam, torch.optim.Adam, 0.01, id="adam-l2"),
    pytest.param(qo.AdamW, torch.optim.AdamW, 0.01, id="adamw"),
]


# --- helpers ----------------------------------------------------------------------------------


def dequantized_states(opt, p):
    return dequantized(opt.state[p]["exp_avg"]), dequantized(opt.state[p]["exp_avg_sq"])


def hyper(opt_class, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    return reference.adam_hyperparameters(lr, *betas, eps, weight_decay, opt_class.decoupled_weight_decay, step)


# --- 32-bit state against torch.optim -----------------------------------------------------------

def one_step(opt_class, params0, grad, **kwargs):
    p = torch.nn.Parameter(params0.clone())
    opt = opt_class([p], **kwargs)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


@pytest.mark.parametrize("ours, theirs, weight_decay", OURS_AND_TORCH)
def test_single_step_within_one_ulp_of_torch(ours, theirs, weight_decay):
    """quantlab rounds every float32 operation separately (so NumPy, Numba and CUDA agree bit for
    bit); torch's CPU kernels fuse lerp / addcmul / add-with-alpha into FMAs. With |p| in [0.5, 2]
    and lr = 1e-3 the update is ~1e-3 |p|, so a few-ulp difference in the update is far below an
    ulp of p, and only the final rounding of p + update can differ: at most 1 ulp (measured: 1 ulp,
    in ~0.01% of the elements).

    Except, with L2 decay, where grad + wd * p cancels: torch rounds that sum once (FMA), quantlab
    twice, and the first step's update lr * g / (|g| + eps) is sensitive to g's relative error when
    |g| is small. Those elements (|grad + wd * p| < 1e-4: 24 of the 50000 here) are left out of the
    1-ulp bound; the largest difference including them is printed (measured: 2 ulps)."""
    gen = torch.Generator().manual_seed(0)
    n = 50_000
    signs = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    params0 = (0.5 + 1.5 * torch.rand(n, generator=gen)) * signs
    grad = spread(gen, n, -6, 2)
    grad[::97] = 0.0
    kwargs = dict(lr=1e-3, weight_decay=weight_decay)
    p_ours = one_step(ours, params0, grad, state_bits=32, **kwargs)
    p_torch = one_step(theirs, params0, grad, foreach=False, **kwargs)
    ulps = ulps_apart(p_ours, p_torch)
    if ours.decoupled_weight_decay or weight_decay == 0:
        well_conditioned = torch.ones(n, dtype=torch.bool)
    else:
        well_conditioned = (grad.double() + weight_decay * params0.double()).abs() >= 1e-4
        assert well_conditioned.float().mean() > 0.999
    worst = ulps[well_conditioned].max().item()
    print(f"single step, {ours.__name__} weight_decay={weight_decay}: max {worst} ulp from torch "
          f"({int((ulps > 0).sum())} of {n} differ; {ulps.max().item()} ulps including cancelling "
          f"grad + wd * p)")
    assert worst <= 1
    assert not torch.equal(p_ours, params0)


@pytest.mark.parametrize("ours, theirs, weight_decay",
                         [p for p in OURS_AND_TORCH if p.id != "adam-l2"])
def test_single_step_near_zero_parameters_within_few_ulps_of_torch(ours, theirs, weight_decay):
    """Parameters over many decades, exact zeros included: where p + update cancels, the result is
    small and its own ulp meaningless, so measure in ulps of max(|p|, |update|). The update's few
    separately rounded operations give a few such ulps (measured: 4); bound 8.

    Adam with L2 decay is left out: torch computes grad + wd * p with one rounding (FMA); where that
    sum cancels to ~eps, the first step's direction m / (sqrt(v) + eps) inherits the cancellation
    and hundreds of ulps appear; that is the FMA, not an error in either (the well-scaled test
    above covers L2 decay)."""
    gen = torch.Generator().manual_seed(1)
    n = 50_000
    params0 = spread(gen, n, -4, 1)
    params0[::101] = 0.0
    grad = spread(gen, n, -6, 2)
    grad[::97] = 0.0
    kwargs = dict(lr=1e-3, weight_decay=weight_decay)
    p_ours = one_step(ours, params0, grad, state_bits=32, **kwargs).numpy().astype(np.float64)
    p_torch = one_step(theirs, params0, grad, foreach=False, **kwargs).numpy()
    scale = np.maximum(np.abs(params0.numpy()), np.abs(p_torch - params0.numpy()))
    worst = float(np.max(np.abs(p_ours - p_torch) / np.spacing(scale)))
    print(f"single step near zero, {ours.__name__}: max {worst} ulps of max(|p|, |update|)")
    assert worst <= 8


@pytest.mark.parametrize("ours, theirs, weight_decay",
                         [pytest.param(qo.Adam, torch.optim.Adam, 0.0, id="adam"),
                          pytest.param(qo.Adam, torch.optim.Adam, 0.05, id="adam-l2"),
                          pytest.param(qo.AdamW, torch.optim.AdamW, 0.05, id="adamw")])
def test_100_steps_track_torch(ours, theirs, weight_decay):
    """Total parameter change after 100 steps: each step rounds p (|p| ~ 1) to an ulp of ~1e-7
    independently in the two implementations, against a total change of ~0.1, so a relative
    deviation near 1e-6 is expected. Measured (seeds 0-2): 5.8e-7 .. 8.3e-7; bound 4e-6.
    States: measured 7.6e-8 (exp_avg), 5.4e-8 (exp_avg_sq); bound 4e-7."""
    kwargs = dict(lr=1e-3, weight_decay=weight_decay)
    params0, ours_p, ours_opt = run_fixed_gradients(lambda ps: ours(ps, state_bits=32, **kwargs), 100)
    _, torch_p, torch_opt = run_fixed_gradients(lambda ps: theirs(ps, foreach=False, **kwargs), 100)
    delta_ours = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(ours_p, params0)])
    delta_torch = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(torch_p, params0)])
    deviation = relative_deviation(delta_ours, delta_torch)
    state_deviation = {}
    for key in ("exp_avg", "exp_avg_sq"):
        a = torch.cat([ours_opt.state[p][key].flatten() for p in ours_p])
        b = torch.cat([torch_opt.state[p][key].flatten() for p in torch_p])
        state_deviation[key] = relative_deviation(a, b)
    print(f"100 steps, {ours.__name__} wd={weight_decay}: |dp - dp_torch| / |dp_torch| = {deviation:.3e}, "
          f"states {state_deviation}")
    assert delta_torch.norm() > 0.01  # the parameters did move
    assert deviation < 4e-6
    assert state_deviation["exp_avg"] < 4e-7
    assert state_deviation["exp_avg_sq"] < 4e-7


# --- exact agreement with the reference through the optimizer ---------------------------------

@pytest.mark.parametrize("opt_class", [qo.Adam, qo.AdamW])
@pytest.mark.parametrize("block_size", [64, 256, 1000])
def test_8bit_steps_are_the_reference_steps(opt_class, block_size):
    """Through the torch optimizer (flat views, step counting, hyperparameters) three 8-bit steps
    equal reference.step_8bit bit for bit."""
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(77, 71, generator=gen))  # 5467 elements, last block partial
    kwargs = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.02)
    opt = opt_class([p], block_size=block_size, **kwargs)
    signed, unsigned = dynamic_code(True), dynamic_code(False)
    param = flat(p).copy()
    m_q, m_absmax = reference.quantize_blockwise(np.zeros(param.size, np.float32), signed, block_size)
    v_q, v_absmax = reference.quantize_blockwise(np.zeros(param.size, np.float32), unsigned, block_size)
    for step in range(1, 4):
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        param, m_q, m_absmax, v_q, v_absmax = reference_adam_step_8bit(
            param, flat(p.grad), m_q, m_absmax, v_q, v_absmax, hyper(opt_class, step, **kwargs),
            signed, unsigned, block_size)
        state = opt.state[p]
        assert state["step"] == step
        assert_bits_equal(flat(p), param, "param")
        assert_bits_equal(flat(state["exp_avg"].indices), m_q, "exp_avg indices")
        assert_bits_equal(state["exp_avg"].absmax.numpy(), m_absmax, "exp_avg absmax")
        assert_bits_equal(flat(state["exp_avg_sq"].indices), v_q, "exp_avg_sq indices")
        assert_bits_equal(state["exp_avg_sq"].absmax.numpy(), v_absmax, "exp_avg_sq absmax")


# --- 8-bit state against bitsandbytes --------------------------------------------------------

def deviations_vs_torch(n, steps, seed, zero_fraction=0.0):
    bnb = pytest.importorskip("bitsandbytes")
    p0, p_torch, _, _ = run_single_tensor(lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False), n, steps, seed,
                                          zero_fraction)
    _, p_ours, ours_opt, _ = run_single_tensor(lambda ps: qo.Adam(ps, lr=1e-3), n, steps, seed, zero_fraction)
    _, p_bnb, bnb_opt, _ = run_single_tensor(
        lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3, weight_decay=0, min_8bit_size=4096), n, steps, seed,
        zero_fraction)
    # both really keep 8-bit states
    ours_state, bnb_state = (next(iter(opt.state.values())) for opt in (ours_opt, bnb_opt))
    assert layout(ours_state) == EIGHT_BIT
    assert bnb_state["state1"].dtype == torch.uint8 and bnb_state["state2"].dtype == torch.uint8
    delta_torch = p_torch - p0
    return (relative_deviation(p_ours - p0, delta_torch), relative_deviation(p_bnb - p0, delta_torch),
            p0, p_torch, p_ours, p_bnb)


def test_8bit_adam_deviates_from_fp32_no_more_than_bitsandbytes():
    """20 steps, lr 1e-3, no weight decay. Both keep m and v in the same dynamic maps (bit-identical,
    see test_bitsandbytes_oracle.py), blocks of 256, and the same update; bitsandbytes' CPU quantizer
    misses the nearest code value near ties and near 0, quantlab does not. So quantlab's deviation
    is only slightly smaller: 0.056-0.094% (relative) below bitsandbytes' at 2**21 elements, seeds
    0-5 (quantlab lower in all six). At 2**14-2**16 elements the seed-to-seed scatter of that gap
    (~0.1-0.2%) exceeds it and either can come out ahead, hence 2**21. The two deviations must
    also agree within 1% (measured gap 0.06%): a quantlab deviation far below bitsandbytes' would
    mean it is not really quantizing."""
    ours, theirs, *_ = deviations_vs_torch(n=2**21, steps=20, seed=0)
    print(f"8-bit Adam, relative deviation of the parameter change from fp32 torch Adam: "
          f"quantlab {ours:.6e}, bitsandbytes {theirs:.6e}")
    assert ours <= theirs
    assert ours == pytest.approx(theirs, rel=0.01)
    assert 1e-3 < ours < 0.05  # 8-bit states deviate, but little (measured 1.62e-2)


def test_8bit_adam_keeps_zero_gradient_elements_still():
    """Elements whose gradient is always exactly 0 (unused embedding rows, say) have m = v = 0 in
    fp32 Adam and do not move. quantlab's codes hold 0 exactly, so they stay put bit for bit;
    bitsandbytes' CPU quantizer stores 0 in a non-zero block as a small non-zero value, so its copy
    drifts (measured: ~3300 of the ~3300 such elements moved), and its deviation is larger
    (measured 1.64e-2 vs quantlab 1.62e-2)."""
    ours, theirs, p0, p_torch, p_ours, p_bnb = deviations_vs_torch(n=2**16, steps=20, seed=0, zero_fraction=0.05)
    still = p_torch == p0
    moved_bnb = int((p_bnb[still] != p0[still]).sum())
    print(f"zero-gradient elements: {int(still.sum())}; moved by quantlab "
          f"{int((p_ours[still] != p0[still]).sum())}, by bitsandbytes {moved_bnb}; "
          f"deviations quantlab {ours:.6e}, bitsandbytes {theirs:.6e}")
    assert still.sum() > 0.04 * p0.numel()
    assert torch.equal(p_ours[still], p0[still])
    assert ours <= theirs


# --- a small model --------------------------------------------------------------------------


def test_8bit_adamw_trains_a_small_model_like_32bit():
    """MLP 32-256-256-10 on a fixed synthetic 10-class set, 200 AdamW steps (batch 128, lr 1e-3):
    the loss falls from ~2.3 to ~0.12. The 8-bit run's final full-data loss is within 2% of the
    32-bit run's: measured gaps over seeds 0-4 were -0.34% .. +0.10% (seed 0, tested: +0.10%),
    so 2% is ~6x the largest measured gap while a real state error would show as a gap far above it."""
    assert_8bit_trains_like_32bit("AdamW", lambda bits: (lambda ps: qo.AdamW(ps, lr=1e-3, state_bits=bits)),
                                  "exp_avg", 0.25 * math.log(10), 0.02)


# --- state layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [64, 256, 2048])
def test_state_layout_and_size(block_size):
    gen = torch.Generator().manual_seed(3)
    big = torch.nn.Parameter(torch.randn(64, 4096 // 64 * 3, generator=gen))  # 12288 = 3 * 4096
    odd = torch.nn.Parameter(torch.randn(4097, generator=gen))
    at_threshold = torch.nn.Parameter(torch.randn(64, 64, generator=gen))  # exactly min_8bit_size
    small = torch.nn.Parameter(torch.randn(4095, generator=gen))
    params = [big, odd, at_threshold, small]
    opt = qo.Adam(params, block_size=block_size, min_8bit_size=4096)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()

    for p in (big, odd, at_threshold):
        state = opt.state[p]
        assert layout(state) == EIGHT_BIT
        blocks = math.ceil(p.numel() / block_size)
        for name in ("exp_avg", "exp_avg_sq"):
            q, absmax = state[name].indices, state[name].absmax
            assert q.dtype == torch.uint8 and q.shape == p.shape and state[name].block_size == block_size
            assert absmax.dtype == torch.float32 and absmax.shape == (blocks,)
        state_bytes = sum(v.numel() * v.element_size() for v in state_tensors(state).values())
        assert state_bytes == sum(state[name].nbytes for name in ("exp_avg", "exp_avg_sq"))
        assert state_bytes == 2 * p.numel() + 8 * blocks
        if p.numel() % block_size == 0:
            assert state_bytes / p.numel() == 2 + 8 / block_size

    state = opt.state[small]
    assert layout(state) == THIRTY_TWO_BIT
    for name in THIRTY_TWO_BIT:
        assert state[name].dtype == torch.float32 and state[name].shape == small.shape


def test_state_bits_32_keeps_every_state_in_float32():
    p = torch.nn.Parameter(torch.randn(100_000))
    opt = qo.AdamW([p], state_bits=32)
    p.grad = torch.randn(p.shape)
    opt.step()
    assert layout(opt.state[p]) == THIRTY_TWO_BIT


# --- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("state_bits", [8, 32])
@pytest.mark.parametrize("opt_class", [qo.Adam, qo.AdamW])
def test_state_dict_round_trip_is_exact(opt_class, state_bits):
    kwargs = dict(lr=1e-2, weight_decay=0.01, state_bits=state_bits, block_size=128)

    model = checkpoint_model(0)
    opt = opt_class(model.parameters(), **kwargs)
    checkpoint_steps(model, opt, 10, start=0)
    checkpoint_steps(model, opt, 10, start=10)

    model_a = checkpoint_model(0)
    opt_a = opt_class(model_a.parameters(), **kwargs)
    checkpoint_steps(model_a, opt_a, 10, start=0)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    # torch's default weights-only unpickler: quantlab's state_dict holds only tensors and plain data.
    saved = torch.load(buffer, weights_only=True)
    model_b = checkpoint_model(1)  # different initial weights: loading must overwrite them
    opt_b = opt_class(model_b.parameters(), **kwargs)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optimizer"])
    checkpoint_steps(model_b, opt_b, 10, start=10)

    expected = EIGHT_BIT if state_bits == 8 else THIRTY_TWO_BIT
    assert any(layout(opt.state[p]) == expected for p in model.parameters())
    assert_same_parameters_and_states(model.parameters(), opt, model_b.parameters(), opt_b)


# --- per-parameter options --------------------------------------------------------------------

def test_set_options_before_building_gives_float32_state():
    a, b = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    qo.set_options(a, state_bits=32)
    opt = qo.Adam([a, b])
    a.grad, b.grad = torch.randn(5000), torch.randn(5000)
    opt.step()
    assert layout(opt.state[a]) == THIRTY_TWO_BIT
    assert layout(opt.state[b]) == EIGHT_BIT


@pytest.mark.parametrize("opt_class", [qo.Adam, qo.AdamW])
def test_set_options_after_first_step_converts_state(opt_class):
    """8-bit for a step, 32-bit for two (from the dequantized states), then 8-bit again: each step
    is the reference step of its format, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(6000, generator=gen))
    opt = opt_class([p], lr=1e-3, weight_decay=0.01)
    grads = [torch.randn(6000, generator=gen) for _ in range(5)]
    h = [None] + [hyper(opt_class, s, weight_decay=0.01) for s in range(1, 6)]

    p.grad = grads[0]
    opt.step()
    assert layout(opt.state[p]) == EIGHT_BIT
    m, v = dequantized_states(opt, p)

    qo.set_options(p, state_bits=32)
    assert layout(opt.state[p]) == EIGHT_BIT  # converted at the next step, not before
    param = flat(p).copy()
    for step in (2, 3):
        p.grad = grads[step - 1]
        opt.step()
        param, m, v = reference.adam_update(param, flat(p.grad), m, v, h[step])
        state = opt.state[p]
        assert layout(state) == THIRTY_TWO_BIT and state["step"] == step
        assert_bits_equal(flat(p), param, "param")
        assert_bits_equal(flat(state["exp_avg"]), m, "exp_avg")
        assert_bits_equal(flat(state["exp_avg_sq"]), v, "exp_avg_sq")

    qo.set_options(p, state_bits=8)
    p.grad = grads[3]
    opt.step()
    signed, unsigned = dynamic_code(True), dynamic_code(False)
    expected = reference_adam_step_8bit(param, flat(p.grad), *reference.quantize_blockwise(m, signed, 256),
                                        *reference.quantize_blockwise(v, unsigned, 256), h[4], signed, unsigned, 256)
    state = opt.state[p]
    assert layout(state) == EIGHT_BIT
    for actual, exp, what in zip((flat(p), flat(state["exp_avg"].indices), state["exp_avg"].absmax.numpy(),
                                  flat(state["exp_avg_sq"].indices), state["exp_avg_sq"].absmax.numpy()),
                                 expected, ("param", "m_q", "m_absmax", "v_q", "v_absmax")):
        assert_bits_equal(actual, exp, what)


def test_set_options_lr_override_equals_param_group():
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(5000, generator=gen), torch.randn(300, generator=gen)]
    grads = [[torch.randn(5000, generator=gen), torch.randn(300, generator=gen)] for _ in range(3)]

    def run(make):
        params = [torch.nn.Parameter(s.clone()) for s in start]
        opt = make(params)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        return [p.detach() for p in params]

    def with_override(params):
        qo.set_options(params[1], lr=1e-2)
        return qo.AdamW(params, lr=1e-3)

    overridden = run(with_override)
    grouped = run(lambda ps: qo.AdamW([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 1e-2}], lr=1e-3))
    plain = run(lambda ps: qo.AdamW(ps, lr=1e-3))
    assert torch.equal(overridden[0], grouped[0]) and torch.equal(overridden[1], grouped[1])
    assert torch.equal(overridden[0], plain[0])
    assert not torch.equal(overridden[1], plain[1])


def test_set_options_unknown_name_raises_at_step():
    p = torch.nn.Parameter(torch.randn(10))
    qo.set_options(p, momentum_dtype="bf16")  # recorded; the optimizer is not known yet
    opt = qo.Adam([p])
    p.grad = torch.randn(10)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="momentum_dtype"):
        opt.step()
    assert torch.equal(p, before) and not opt.state[p]


def test_set_options_checks_its_arguments():
    with pytest.raises(ValueError, match="state_bits"):
        qo.set_options(torch.nn.Parameter(torch.randn(3)), state_bits=16)
    with pytest.raises(TypeError):
        qo.set_options([1.0, 2.0], state_bits=32)


# --- the torch.optim API ------------------------------------------------------------------------

def test_param_groups_with_different_hyperparameters_match_separate_optimizers():
    gen = torch.Generator().manual_seed(6)
    start = [torch.randn(5000, generator=gen), torch.randn(200, generator=gen), torch.randn(4500, generator=gen)]
    grads = [[torch.randn(s.shape, generator=gen) for s in start] for _ in range(3)]
    settings = [dict(lr=1e-3), dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1),
                dict(lr=2e-3, eps=1e-6, state_bits=32, block_size=64)]

    params = [torch.nn.Parameter(s.clone()) for s in start]
    grouped = qo.AdamW([{"params": [p], **kw} for p, kw in zip(params, settings)], weight_decay=0.0)
    separate_params = [torch.nn.Parameter(s.clone()) for s in start]
    separate = [qo.AdamW([p], **{"weight_decay": 0.0, **kw}) for p, kw in zip(separate_params, settings)]
    for g in grads:
        for p, q, gi in zip(params, separate_params, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        grouped.step()
        for opt in separate:
            opt.step()
    assert grouped.param_groups[1]["betas"] == (0.8, 0.95)
    assert layout(grouped.state[params[0]]) == EIGHT_BIT and layout(grouped.state[params[2]]) == THIRTY_TWO_BIT
    for p, q in zip(params, separate_params):
        assert torch.equal(p, q)


def test_add_param_group_fills_defaults_and_steps():
    gen = torch.Generator().manual_seed(7)
    a = torch.nn.Parameter(torch.randn(5000, generator=gen))
    b = torch.nn.Parameter(torch.randn(5000, generator=gen))
    b_start = b.detach().clone()
    opt = qo.Adam([a], lr=1e-3, block_size=128)
    a.grad = torch.randn(5000, generator=gen)
    opt.step()
    opt.add_param_group({"params": [b], "lr": 1e-2})
    group = opt.param_groups[1]
    assert group["lr"] == 1e-2 and group["block_size"] == 128 and group["state_bits"] == 8
    a.grad, b.grad = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen)
    opt.step()
    assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 1
    alone = torch.nn.Parameter(b_start.clone())
    alone_opt = qo.Adam([alone], lr=1e-2, block_size=128)
    alone.grad = b.grad.clone()
    alone_opt.step()
    assert torch.equal(alone, b)


def test_zero_grad():
    p = torch.nn.Parameter(torch.randn(10))
    opt = qo.Adam([p])
    p.grad = torch.randn(10)
    opt.zero_grad(set_to_none=False)
    assert p.grad is not None and torch.equal(p.grad, torch.zeros(10))
    opt.zero_grad()
    assert p.grad is None


def test_step_with_closure_returns_the_loss_and_uses_its_gradient():
    gen = torch.Generator().manual_seed(8)
    x, target = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
    w0 = torch.randn(8, 1, generator=gen)
    w = torch.nn.Parameter(w0.clone())
    opt = qo.Adam([w], lr=1e-2)
    calls = []

    def closure():
        opt.zero_grad()
        loss = ((x @ w - target) ** 2).mean()
        loss.backward()
        calls.append(loss.detach())
        return loss

    returned = opt.step(closure)
    assert len(calls) == 1 and torch.equal(returned.detach(), calls[0])

    manual = torch.nn.Parameter(w0.clone())
    manual_opt = qo.Adam([manual], lr=1e-2)
    ((x @ manual - target) ** 2).mean().backward()
    manual_opt.step()
    assert torch.equal(w, manual)


def test_step_lr_scheduler_changes_the_effective_lr():
    """StepLR(step_size=2, gamma=0.1) from lr 1e-2: steps 1-2 at 1e-2, steps 3-4 at 1e-3, the same as
    setting the group's lr by hand, and different from never lowering it."""
    gen = torch.Generator().manual_seed(9)
    start = torch.randn(5000, generator=gen)
    grads = [torch.randn(5000, generator=gen) for _ in range(4)]

    def run(lr_at_step, scheduled=False):
        p = torch.nn.Parameter(start.clone())
        opt = qo.AdamW([p], lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1) if scheduled else None
        lrs = []
        for step, g in enumerate(grads, start=1):
            if not scheduled:
                opt.param_groups[0]["lr"] = lr_at_step(step)
            lrs.append(opt.param_groups[0]["lr"])
            p.grad = g.clone()
            opt.step()
            if scheduler is not None:
                scheduler.step()
        return p.detach(), lrs

    scheduled, lrs = run(None, scheduled=True)
    by_hand, _ = run(lambda s: 1e-2 if s <= 2 else 1e-2 * 0.1)
    constant, _ = run(lambda s: 1e-2)
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    assert torch.equal(scheduled, by_hand)
    assert not torch.equal(scheduled, constant)


def test_step_hooks_are_called():
    p = torch.nn.Parameter(torch.randn(10))
    start = p.detach().clone()
    opt = qo.AdamW([p])
    seen = []

    def pre(optimizer, args, kwargs):
        assert optimizer is opt
        seen.append(("pre", torch.equal(p, start)))

    def post(optimizer, args, kwargs):
        seen.append(("post", torch.equal(p, start)))

    pre_handle = opt.register_step_pre_hook(pre)
    post_handle = opt.register_step_post_hook(post)
    p.grad = torch.randn(10)
    opt.step()
    assert seen == [("pre", True), ("post", False)]
    pre_handle.remove()
    post_handle.remove()
    opt.step()
    assert len(seen) == 2


# --- non-finite gradients ---------------------------------------------------------------------

def nonfinite_setup(skip_nonfinite):
    """Four parameters (32-bit, two 8-bit, one crossing the 65536-element check chunk, and 32-bit),
    after one finite step so every state is non-trivial."""
    gen = torch.Generator().manual_seed(10)
    shapes = [(100,), (70, 100), (70_000,), (5,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = qo.Adam(params, lr=1e-3, skip_nonfinite=skip_nonfinite)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    assert layout(opt.state[params[1]]) == EIGHT_BIT and layout(opt.state[params[0]]) == THIRTY_TWO_BIT
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params, opt


NONFINITE_CASES = [(value, index, position) for value in (float("nan"), float("inf"), float("-inf"))
                   for index, position in ((0, 0), (1, 6999), (2, 69_999), (3, 2))]


@pytest.mark.parametrize("value, index, position", NONFINITE_CASES)
def test_nonfinite_gradient_raises_and_changes_nothing(value, index, position):
    params, opt = nonfinite_setup(skip_nonfinite=False)
    qo.set_options(params[2], state_bits=32)  # a pending conversion must not happen either
    params[index].grad.view(-1)[position] = value
    before = snapshot(opt, params)
    with pytest.raises(FloatingPointError):
        opt.step()
    assert_same_snapshot(before, snapshot(opt, params))
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_skipped_and_counted(value):
    params, opt = nonfinite_setup(skip_nonfinite=True)
    good = [p.grad.clone() for p in params]
    params[2].grad[12345] = value
    before = snapshot(opt, params)
    assert opt.step() is None
    params[0].grad[0] = value
    opt.step()
    assert_same_snapshot(before, snapshot(opt, params))
    assert opt.skipped_steps == 2
    for p, g in zip(params, good):
        p.grad = g
    opt.step()
    assert opt.skipped_steps == 2
    assert all(opt.state[p]["step"] == 2 for p in params)
    assert not torch.equal(params[2], before[0][2])


# --- argument checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(amsgrad=True), ValueError, "amsgrad"),
    (dict(maximize=True), ValueError, "maximize"),
    (dict(state_bits=16), ValueError, "state_bits"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=2.5), ValueError, "block_size"),
    (dict(signed_code="dynamic"), TypeError, "signed_code"),
    (dict(unsigned_code=np.linspace(0, 1, 256)), TypeError, "unsigned_code"),
    (dict(lr=-1e-3), ValueError, "learning rate"),
    (dict(betas=(1.0, 0.999)), ValueError, "betas"),
    (dict(betas=(0.9, -0.1)), ValueError, "betas"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(min_8bit_size=-1), ValueError, "min_8bit_size"),
])
@pytest.mark.parametrize("opt_class", [qo.Adam, qo.AdamW])
def test_bad_arguments_raise(opt_class, kwargs, error, match):
    with pytest.raises(error, match=match):
        opt_class([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_custom_codes_are_accepted():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = qo.Adam([p], signed_code=linear_code(8, True), unsigned_code=linear_code(8, False))
    p.grad = torch.randn(5000)
    opt.step()
    state = opt.state[p]
    assert (state["exp_avg"].code.name, state["exp_avg_sq"].code.name) == ("linear8-signed", "linear8-unsigned")
    assert state["exp_avg"].block_size == state["exp_avg_sq"].block_size == 256


def test_sparse_gradient_raises():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = qo.Adam(emb.parameters())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_float64_parameters_are_not_implemented():
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    opt = qo.AdamW([p])
    p.grad = torch.randn(10, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="float32, float16 or bfloat16"):
        opt.step()


def test_gradient_of_another_dtype_raises_and_changes_nothing():
    p = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
    start = p.detach().clone()
    opt = qo.AdamW([p])
    p.grad_dtype = None  # torch refuses a gradient of another dtype unless told to accept one
    p.grad = torch.randn(5000)
    with pytest.raises(ValueError, match="dtype and device"):
        opt.step()
    assert torch.equal(p, start) and not opt.state


def test_non_contiguous_parameter_raises():
    p = torch.nn.Parameter(torch.randn(100, 60).t())
    opt = qo.AdamW([p])
    p.grad = torch.randn(60, 100)
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()


def test_parameters_without_gradient_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(5000))
    b_start = b.detach().clone()
    opt = qo.Adam([a, b])
    a.grad = torch.randn(10)
    opt.step()
    assert torch.equal(b, b_start) and b not in opt.state
    assert opt.state[a]["step"] == 1
