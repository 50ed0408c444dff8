"""quantlab.optim.SGD and Lion: their fused kernels against the NumPy reference bit for bit, the
32-bit optimizers against torch.optim.SGD and Lion's definition, the 8-bit states against fp32 and
bitsandbytes, and the torch.optim API (arguments, per-parameter options, schedulers, checkpoints,
non-finite gradients). The BlockwiseOptimizer machinery shared with Adam (state layout, option
conversion, closures, hooks) is tested in test_adam.py and not repeated here.

Measured numbers quoted in the comments are from torch 2.14.1 (CPU), bitsandbytes 0.50.2.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantlab.optim as qo
from helpers.kernels import (
    EMPTY_F32,
    SIGNED_CODES,
    assert_bits_equal,
    block_sizes,
    check_step_8bit,
    check_step_32bit,
    spread_np,
)
from helpers.optim import (
    assert_8bit_trains_like_32bit,
    assert_same_parameters_and_states,
    assert_same_snapshot,
    assert_states_equal,
    checkpoint_model,
    checkpoint_steps,
    clone_state,
    dequantized,
    flat,
    layout,
    relative_deviation,
    run_fixed_gradients,
    run_single_tensor,
    snapshot,
    ulps_apart,
)
from quantlab import reference
from quantlab.codes import dynamic_code
from quantlab.kernels import cpu, scalar

SGD_8BIT_EXAMPLES = 1500
LION_8BIT_EXAMPLES = 1500
SGD_32BIT_EXAMPLES = 600
LION_32BIT_EXAMPLES = 600
PLAIN_SGD_EXAMPLES = 300


# --- kernels against the reference, bit for bit ---------------------------------------------------


@st.composite
def one_state_arrays(draw, max_n=5000):
    """param, grad and one signed state (float32), the state all zeros on a first step; values over
    many decades with exact zeros and -0.0 (zero_fraction 0.9 makes all-zero blocks)."""
    n = draw(st.one_of(st.sampled_from([1, 2, 255, 256, 257]), st.integers(1, max_n)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    zero_fraction = draw(st.sampled_from([0.0, 0.05, 0.5, 0.9]))
    param = spread_np(rng, n, -8, 2, zero_fraction)
    grad = spread_np(rng, n, -9, 2, zero_fraction)
    fresh = draw(st.booleans())
    state = np.zeros(n, np.float32) if fresh else spread_np(rng, n, -9, 1, zero_fraction)
    return param, grad, state


@st.composite
def sgd_hyper(draw, momentum=None):
    """torch.optim.SGD's options (nesterov only with momentum and no dampening, as torch requires);
    step 1 is drawn often: there torch copies the gradient into the buffer."""
    lr = 10.0 ** draw(st.floats(-6, 0))
    if momentum is None:
        momentum = draw(st.one_of(st.just(0.9), st.just(0.0), st.floats(0.0, 0.999)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
    weight_decay = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5)))
    step = draw(st.one_of(st.just(1), st.integers(2, 1000)))
    hyper = reference.sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov, step)
    assert hyper.dtype == np.float32 and hyper.shape == (6,)
    return hyper


@st.composite
def lion_hyper(draw):
    lr = 10.0 ** draw(st.floats(-6, -1))
    beta1 = draw(st.one_of(st.just(0.9), st.floats(0.0, 1.0)))
    beta2 = draw(st.one_of(st.just(0.99), st.floats(0.0, 1.0)))
    weight_decay = draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
    hyper = reference.lion_hyperparameters(lr, beta1, beta2, weight_decay)
    assert hyper.dtype == np.float32 and hyper.shape == (4,)
    return hyper


@settings(max_examples=SGD_8BIT_EXAMPLES, deadline=None)
@given(arrays=one_state_arrays(), hyper=sgd_hyper(), block_size=block_sizes(5000), code=st.sampled_from(SIGNED_CODES))
def test_sgd_step_8bit_matches_reference(arrays, hyper, block_size, code):
    check_step_8bit(scalar.SGD, reference.sgd_update, arrays, hyper, block_size, code)


@settings(max_examples=LION_8BIT_EXAMPLES, deadline=None)
@given(arrays=one_state_arrays(), hyper=lion_hyper(), block_size=block_sizes(5000), code=st.sampled_from(SIGNED_CODES))
def test_lion_step_8bit_matches_reference(arrays, hyper, block_size, code):
    check_step_8bit(scalar.LION, reference.lion_update, arrays, hyper, block_size, code)


@settings(max_examples=SGD_32BIT_EXAMPLES, deadline=None)
@given(arrays=one_state_arrays(), hyper=sgd_hyper())
def test_sgd_step_32bit_matches_reference(arrays, hyper):
    check_step_32bit(scalar.SGD, reference.sgd_update, arrays, hyper)


@settings(max_examples=LION_32BIT_EXAMPLES, deadline=None)
@given(arrays=one_state_arrays(), hyper=lion_hyper())
def test_lion_step_32bit_matches_reference(arrays, hyper):
    check_step_32bit(scalar.LION, reference.lion_update, arrays, hyper)


@settings(max_examples=PLAIN_SGD_EXAMPLES, deadline=None)
@given(arrays=one_state_arrays(), hyper=sgd_hyper(momentum=0.0))
def test_plain_sgd_step_without_state_matches_reference_with_any_buffer(arrays, hyper):
    """Momentum 0: no state (the kernel's state slots are empty). The reference's parameter does not
    depend on the buffer it is given (buffer * 0): bit-identical with a zero buffer, and equal with
    any finite one, where only the sign of an exact-zero result may differ (-0.0 * 0 = -0.0)."""
    param, grad, some_buffer = arrays
    p_k = param.copy()
    cpu.step_32bit(scalar.SGD, 0, p_k, grad.copy(), EMPTY_F32, EMPTY_F32, hyper)
    assert_bits_equal(p_k, reference.sgd_update(param, grad, np.zeros_like(param), hyper)[0], "param")
    with_buffer = reference.sgd_update(param, grad, some_buffer, hyper)[0]
    assert np.array_equal(p_k, with_buffer)
    nonzero = p_k != 0
    assert_bits_equal(p_k[nonzero], with_buffer[nonzero], "param (non-zero results)")


# --- 32-bit SGD against torch.optim.SGD ----------------------------------------------------------

SGD_OPTIONS = [
    pytest.param(dict(momentum=0.9), id="momentum"),
    pytest.param(dict(momentum=0.9, dampening=0.1), id="dampening"),
    pytest.param(dict(momentum=0.9, nesterov=True), id="nesterov"),
    pytest.param(dict(momentum=0.9, weight_decay=0.05), id="momentum-wd"),
    pytest.param(dict(momentum=0.9, dampening=0.5, weight_decay=0.05), id="dampening-wd"),
    pytest.param(dict(momentum=0.9, nesterov=True, weight_decay=0.05), id="nesterov-wd"),
    pytest.param(dict(momentum=0.0), id="plain"),
    pytest.param(dict(momentum=0.0, weight_decay=0.05), id="plain-wd"),
    pytest.param(dict(momentum=0.0, dampening=0.5), id="plain-dampening"),  # torch ignores dampening here
]


def buffer_exact(options) -> bool:
    """Without dampening and weight decay, buf * momentum + 1 * g rounds once in both torch and
    quantlab (the product by 1 is exact), and the buffer never sees the parameter."""
    return options.get("dampening", 0.0) == 0 and options.get("weight_decay", 0.0) == 0


def torch_sgd_step(p, buf, grad, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD (foreach=False) from a given parameter and buffer: (param, buffer)."""
    p = torch.nn.Parameter(p.clone())
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                          nesterov=nesterov, foreach=False)
    if buf is not None:
        opt.state[p]["momentum_buffer"] = buf.clone()
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt.state[p].get("momentum_buffer")


def quantlab_sgd_step(p, buf, grad, step, lr, **options):
    """quantlab's 32-bit SGD from a given parameter, buffer and step count: (param, buffer, state)."""
    p = torch.nn.Parameter(p.clone())
    opt = qo.SGD([p], lr=lr, state_bits=32, **options)
    if step > 1:
        opt.state[p]["step"] = step - 1
    if buf is not None:
        opt.state[p]["momentum_buffer"] = buf.clone()
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt.state[p].get("momentum_buffer"), opt.state[p]


@pytest.mark.parametrize("options", SGD_OPTIONS)
def test_sgd_single_steps_within_one_ulp_of_torch(options):
    """Step 1 (torch copies the gradient into the buffer), then step 2 from torch's own parameter
    and buffer, so each is a single step from identical inputs. |p| in [0.5, 2], lr 1e-3, gradients
    up to ~10: the update is far below |p|, so its few separately rounded operations (torch fuses
    add-with-alpha into one FMA) are far below an ulp of p, and only the final rounding of p + update
    can differ: at most 1 ulp (measured: 1 ulp, in 10-40 of 50000 elements, every option set).

    The momentum buffer: bit-identical to torch without weight decay at step 1 (a copy of the
    gradient) and without dampening and weight decay at step 2 (see buffer_exact). Otherwise torch
    rounds g + wd * p and buf * momentum + (1 - dampening) * g once (FMA), quantlab twice; in ulps of
    the largest of |g|, |wd * p|, |momentum * buf| and the result, since the sums can cancel:
    measured 1 (step 1) and 2 (step 2), bound 4."""
    gen = torch.Generator().manual_seed(11)
    n = 50_000
    signs = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    params0 = (0.5 + 1.5 * torch.rand(n, generator=gen)) * signs
    grads = [torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-6, 1, generator=gen) for _ in range(2)]
    for g in grads:
        g[::97] = 0.0
    lr, momentum, wd = 1e-3, options["momentum"], options.get("weight_decay", 0.0)
    p, buf = params0, None
    worst, message = {}, f"SGD {options}:"
    for step, grad in enumerate(grads, start=1):
        p_torch, buf_torch = torch_sgd_step(p, buf, grad, lr, **options)
        p_ours, buf_ours, state = quantlab_sgd_step(p, buf, grad, step, lr, **options)
        ulps = ulps_apart(p_ours, p_torch)
        worst[step] = ulps.max().item()
        message += f" step {step}: max {worst[step]} ulp ({int((ulps > 0).sum())} of {n} differ)"
        if momentum == 0:
            assert layout(state) == {} and buf_torch is None
        elif wd == 0 and (step == 1 or buffer_exact(options)):
            assert torch.equal(buf_ours, buf_torch)
            if step == 1:
                assert torch.equal(buf_ours, grad)  # whatever the dampening
        else:
            terms = [grad.abs(), (wd * p).abs(), buf_torch.abs()] + ([] if buf is None else [(momentum * buf).abs()])
            scale = torch.stack(terms).amax(0).numpy()
            buffer_ulps = ((buf_ours.double() - buf_torch.double()).abs().numpy() / np.spacing(scale)).max()
            message += f", buffer max {buffer_ulps:.3g} ulps of the largest term"
            assert buffer_ulps <= 4
        assert not torch.equal(p_ours, p)  # it did step
        p, buf = p_torch, buf_torch  # the next step starts from torch's parameter and buffer
    print(message)
    assert max(worst.values()) <= 1


def test_sgd_difference_from_torch_is_torch_fused_parameter_update():
    """Momentum without dampening or weight decay: the buffers agree bit for bit, the parameters do
    not. torch's param.add_(buf, alpha=-lr) is one FMA, round(p - lr * buf); quantlab rounds -lr * buf
    first. Where they differ (measured: 9 of 50000 elements, 1 ulp), torch's value is the single
    rounding (emulated in float64: the float32 product is exact there, the sum rounded twice, which
    can only matter at a float32 tie) and quantlab's the double rounding."""
    gen = torch.Generator().manual_seed(12)
    n = 50_000
    params0 = (0.5 + 1.5 * torch.rand(n, generator=gen)) * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    grad = torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-6, 1, generator=gen)
    lr = 1e-3
    p_torch, buf_torch = torch_sgd_step(params0, None, grad, lr, momentum=0.9)
    p_ours, buf_ours, _ = quantlab_sgd_step(params0, None, grad, 1, lr, momentum=0.9)
    assert torch.equal(buf_ours, buf_torch)
    minus_lr = np.float32(-lr)
    p0, buf = params0.numpy(), buf_torch.numpy()
    fused = (p0.astype(np.float64) + np.float64(minus_lr) * buf.astype(np.float64)).astype(np.float32)
    separate = p0 + minus_lr * buf  # float32 throughout
    differ = (p_ours != p_torch).numpy()
    print(f"SGD momentum, one step: {differ.sum()} of {n} parameters differ from torch by "
          f"{ulps_apart(p_ours, p_torch).max().item()} ulp")
    assert differ.any()
    assert ulps_apart(p_ours, p_torch).max().item() == 1
    assert_bits_equal(p_ours.numpy(), separate, "quantlab: separately rounded")
    assert_bits_equal(p_torch.numpy(), fused, "torch: fused")


@pytest.mark.parametrize("options", SGD_OPTIONS)
def test_sgd_100_steps_track_torch(options):
    """Total parameter change after 100 fixed-gradient steps (lr 1e-3), relative to torch's. Each
    step's 1-ulp difference in p (~1) is ~1e-7 of p; the change itself is ~1-12 in norm. Measured
    (seeds 0-2 of run_fixed_gradients; 0 is tested): 1.8e-7 .. 2.8e-7 with momentum (|change|
    ~6-12), 9.1e-7 .. 1.1e-6 without (|change| ~1.3, so the same rounding is relatively larger);
    bound 4e-6. The momentum buffer: bit-identical without dampening and weight decay; otherwise
    measured up to 7.8e-8, bound 4e-7. Without momentum there is no state besides step and format."""
    kwargs = dict(lr=1e-3, **options)
    params0, ours_p, ours_opt = run_fixed_gradients(lambda ps: qo.SGD(ps, state_bits=32, **kwargs), 100)
    _, torch_p, torch_opt = run_fixed_gradients(lambda ps: torch.optim.SGD(ps, foreach=False, **kwargs), 100)
    delta_ours = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(ours_p, params0)])
    delta_torch = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(torch_p, params0)])
    deviation = relative_deviation(delta_ours, delta_torch)
    message = (f"100 steps, SGD {options}: |dp - dp_torch| / |dp_torch| = {deviation:.3e} "
               f"(|dp_torch| {delta_torch.norm():.2f})")
    if options["momentum"] == 0:
        assert all(layout(ours_opt.state[p]) == {} for p in ours_p)
        assert all(ours_opt.state[p]["step"] == 100 for p in ours_p)
    else:
        a = torch.cat([ours_opt.state[p]["momentum_buffer"].flatten() for p in ours_p])
        b = torch.cat([torch_opt.state[p]["momentum_buffer"].flatten() for p in torch_p])
        buffer_deviation = relative_deviation(a, b)
        message += f", buffer {buffer_deviation:.3e}"
        if buffer_exact(options):
            assert torch.equal(a, b)
        else:
            assert 0 < buffer_deviation < 4e-7
    print(message)
    assert delta_torch.norm() > 0.5  # the parameters did move
    assert deviation < 4e-6


# --- 8-bit states against fp32 and bitsandbytes ---------------------------------------------------


N_8BIT = 2**20
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' default, like quantlab's: both keep N_8BIT elements in 8 bits


def eight_bit_deviations(fp32, ours, bnb_factory, n, steps, seed, zero_fraction=0.0):
    """Relative deviation of the parameter change of quantlab's and bitsandbytes' 8-bit optimizers
    from an fp32 run; checks that both really keep an 8-bit state."""
    p0, p_fp32, _, zero = run_single_tensor(fp32, n, steps, seed, zero_fraction)
    _, p_ours, ours_opt, _ = run_single_tensor(ours, n, steps, seed, zero_fraction)
    _, p_bnb, bnb_opt, _ = run_single_tensor(bnb_factory, n, steps, seed, zero_fraction)
    ours_state = next(iter(ours_opt.state.values()))
    bnb_state = next(iter(bnb_opt.state.values()))
    assert set(layout(ours_state).values()) == {8} and ours_opt.param_groups[0]["min_8bit_size"] <= n
    assert bnb_opt.args.min_8bit_size == BNB_MIN_8BIT_SIZE <= n
    assert bnb_state["state1"].dtype == torch.uint8 and bnb_state["absmax1"].numel() == math.ceil(n / 256)
    delta = p_fp32 - p0
    return (relative_deviation(p_ours - p0, delta), relative_deviation(p_bnb - p0, delta),
            p0, p_fp32, p_ours, p_bnb, zero)


def test_8bit_sgd_deviates_from_fp32_like_bitsandbytes():
    """Momentum 0.9, lr 1e-2, no weight decay, 20 steps, 2**20 elements. bitsandbytes' SGD8bit ignores
    dampening and nesterov, so plain momentum is what both compute: buf = momentum * buf + g (the
    gradient at step 1), in the same signed dynamic map, blocks of 256.

    The two deviations are statistically the same, and neither is reliably smaller. The only
    difference is bitsandbytes' quantizer missing the nearest code value within 1.5e-5 of a
    decision point (test_bitsandbytes_oracle.py); near such a tie both choices have almost the same
    error, of opposite signs, so the gap is a random walk, not a bias. Measured over seeds 0-15:
    quantlab minus bitsandbytes = -3.6e-5 .. +2.0e-4 (relative; quantlab larger in 9 of 16, seed 0
    +1.5e-4: quantlab 1.73850e-2, bitsandbytes 1.73824e-2). A strict ours <= theirs would hold only
    for some seeds, so the bound is ours <= theirs * (1 + 1e-3), 5x the largest gap measured; and
    the two agree within 1%, else one would not be quantizing like the other."""
    bnb = pytest.importorskip("bitsandbytes")
    lr = 1e-2
    ours, theirs, *_ = eight_bit_deviations(
        lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, foreach=False),
        lambda ps: qo.SGD(ps, lr=lr, momentum=0.9),
        lambda ps: bnb.optim.SGD8bit(ps, lr=lr, momentum=0.9), N_8BIT, steps=20, seed=0)
    print(f"8-bit SGD momentum, relative deviation of the parameter change from fp32 torch SGD: "
          f"quantlab {ours:.6e}, bitsandbytes {theirs:.6e} ({(ours - theirs) / theirs:+.2e})")
    assert ours <= theirs * (1 + 1e-3)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert 1e-3 < ours < 0.05  # 8-bit states deviate, but little (measured 1.74e-2)


def lion_factories(bnb, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
    kwargs = dict(lr=lr, betas=betas, weight_decay=weight_decay)
    return (lambda ps: qo.Lion(ps, state_bits=32, **kwargs), lambda ps: qo.Lion(ps, **kwargs),
            lambda ps: bnb.optim.Lion8bit(ps, **kwargs), lambda ps: bnb.optim.Lion32bit(ps, **kwargs))


def test_bitsandbytes_lion_is_the_same_algorithm():
    """bitsandbytes' Lion (backends/cpu/ops.py) is the paper's: p *= 1 - lr * wd;
    p -= lr * sign(beta1 * m + (1 - beta1) * g); m = beta2 * m + (1 - beta2) * g. quantlab writes the
    interpolations as lerps, m + (1 - beta) * (g - m), which round differently but only the sign of
    the first reaches p. Their 32-bit versions, 20 steps with weight decay: measured bit-identical
    parameters; bound: a relative deviation of 1e-4, far below the 8-bit deviation (5.7e-2) that
    the next test compares, so bitsandbytes' 8-bit Lion is a fair yardstick for quantlab's."""
    bnb = pytest.importorskip("bitsandbytes")
    ours32, _, _, bnb32 = lion_factories(bnb, weight_decay=0.1)
    p0, p_ours, _, _ = run_single_tensor(ours32, 2**16, 20, seed=1)
    _, p_bnb, bnb_opt, _ = run_single_tensor(bnb32, 2**16, 20, seed=1)
    assert next(iter(bnb_opt.state.values()))["state1"].dtype == torch.float32
    deviation = relative_deviation(p_bnb - p0, p_ours - p0)
    print(f"32-bit Lion, bitsandbytes vs quantlab: relative deviation {deviation:.3e}, "
          f"{int((p_bnb != p_ours).sum())} of {p0.numel()} parameters differ")
    assert deviation <= 1e-4


def test_8bit_lion_deviates_from_fp32_like_bitsandbytes():
    """lr 1e-4, betas (0.9, 0.99), no weight decay, 20 steps, 2**20 elements; the fp32 run is
    quantlab's Lion with state_bits=32 (the same algorithm as bitsandbytes', previous test). The
    deviation is mostly elements whose interpolation c is near 0, where the quantized state flips the
    sign of the step. As with SGD the two deviations are statistically the same: measured over seeds
    0-15, quantlab minus bitsandbytes = -7.9e-4 .. +6.3e-4 relative (quantlab larger in 7 of 16; seed
    0: quantlab 5.67801e-2, bitsandbytes 5.67822e-2). Bound ours <= theirs * (1 + 3e-3), ~5x the
    largest gap; the two agree within 2%."""
    bnb = pytest.importorskip("bitsandbytes")
    fp32, ours8, bnb8, _ = lion_factories(bnb)
    ours, theirs, *_ = eight_bit_deviations(fp32, ours8, bnb8, N_8BIT, steps=20, seed=0)
    print(f"8-bit Lion, relative deviation of the parameter change from fp32 Lion: "
          f"quantlab {ours:.6e}, bitsandbytes {theirs:.6e} ({(ours - theirs) / theirs:+.2e})")
    assert ours <= theirs * (1 + 3e-3)
    assert ours == pytest.approx(theirs, rel=0.02)
    assert 1e-2 < ours < 0.2  # measured 5.68e-2


@pytest.mark.parametrize("name", ["sgd", "lion"])
def test_8bit_zero_gradient_elements_stay_still_unlike_bitsandbytes(name):
    """5% of the elements always get a zero gradient, inside blocks whose absmax is not 0. In fp32
    their buffer / exp_avg stays 0 and they do not move (Lion: sign(0) = 0). quantlab's codes hold 0
    exactly, so its 8-bit copies stay put bit for bit. bitsandbytes stores such a 0 as 2.125e-5 of
    the block's absmax: its SGD moves them by a little (measured: 3324 of 3346 moved; the total
    deviations, 1.734e-2 vs quantlab's 1.733e-2, stay within seed-to-seed scatter), and its Lion
    takes a full lr-sized sign step with them every step (3346 of 3346 moved; deviation 0.634
    against quantlab's 0.057)."""
    bnb = pytest.importorskip("bitsandbytes")
    if name == "sgd":
        lr = 1e-2
        factories = (lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, foreach=False),
                     lambda ps: qo.SGD(ps, lr=lr, momentum=0.9),
                     lambda ps: bnb.optim.SGD8bit(ps, lr=lr, momentum=0.9))
    else:
        factories = lion_factories(bnb)[:3]
    ours, theirs, p0, p_fp32, p_ours, p_bnb, zero = eight_bit_deviations(*factories, 2**16, steps=20, seed=0,
                                                                          zero_fraction=0.05)
    moved_bnb = int((p_bnb[zero] != p0[zero]).sum())
    print(f"{name}: {int(zero.sum())} zero-gradient elements; moved by quantlab "
          f"{int((p_ours[zero] != p0[zero]).sum())}, by bitsandbytes {moved_bnb}; "
          f"deviations quantlab {ours:.4e}, bitsandbytes {theirs:.4e}")
    assert zero.sum() > 0.04 * p0.numel()
    assert torch.equal(p_fp32[zero], p0[zero])
    assert torch.equal(p_ours[zero], p0[zero])
    if name == "lion":
        assert moved_bnb > 0.9 * int(zero.sum())
        assert ours < 0.5 * theirs


# --- Lion's definition ----------------------------------------------------------------------------

@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("lr, betas, weight_decay", [(1e-3, (0.9, 0.99), 0.0), (3e-2, (0.5, 0.9), 0.1)])
def test_lion_first_step_is_decay_and_sign_of_the_gradient(state_bits, lr, betas, weight_decay):
    """From a zero state: p * (1 - lr * wd) - lr * sign((1 - beta1) * g), exp_avg = (1 - beta2) * g,
    computed here in float32 torch ops (lr * sign is exact, so each side rounds once). The gradients
    include exact zeros (no step), and subnormals whose product with 1 - beta1 underflows to 0 (no
    step either). An all-zero 8-bit state dequantizes to exact zeros, so 8 bits gives the same step."""
    gen = torch.Generator().manual_seed(13)
    n = 6000
    params0 = (0.01 + torch.rand(n, generator=gen)) * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    grad = torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-8, 2, generator=gen)
    grad[::50] = 0.0
    grad[1::50] = 1e-45  # the smallest subnormal: (1 - beta1) * 1e-45 rounds to 0
    grad[2::50] = -1e-45
    p = torch.nn.Parameter(params0.clone())
    opt = qo.Lion([p], lr=lr, betas=betas, weight_decay=weight_decay, state_bits=state_bits)
    p.grad = grad.clone()
    opt.step()

    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    direction = torch.sign(grad * f32(1 - betas[0]))
    expected = params0 * f32(1 - lr * weight_decay) - f32(lr) * direction
    assert_bits_equal(flat(p), expected.numpy(), "param")
    no_step = direction == 0
    assert no_step[::50].all() and no_step[1::50].all() and no_step.sum() >= 3 * n // 50
    assert torch.equal(p[no_step], (params0 * f32(1 - lr * weight_decay))[no_step])
    exp_avg = grad * f32(1 - betas[1])
    if state_bits == 32:
        assert torch.equal(opt.state[p]["exp_avg"], exp_avg)  # == (+0.0 equals -0.0)
    else:
        state = opt.state[p]["exp_avg"]
        assert (state.code, state.block_size) == (dynamic_code(True), 256)
        q, absmax = reference.quantize_blockwise(exp_avg.numpy(), dynamic_code(True), 256)
        assert_bits_equal(flat(state.indices), q, "exp_avg indices")
        assert_bits_equal(state.absmax.numpy(), absmax, "exp_avg absmax")


@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_zero_gradient_and_zero_state_parameters_only_decay(state_bits, weight_decay):
    """Every 7th element always has a zero gradient, so its state stays 0 and sign(0) = 0: over 10
    steps it only decays, p <- p * float32(1 - lr * wd), bit for bit (and not at all without weight
    decay), while its neighbours in the same 8-bit blocks move."""
    gen = torch.Generator().manual_seed(14)
    n, lr = 7000, 1e-2
    params0 = torch.randn(n, generator=gen)
    still = torch.zeros(n, dtype=torch.bool)
    still[::7] = True
    p = torch.nn.Parameter(params0.clone())
    opt = qo.Lion([p], lr=lr, weight_decay=weight_decay, state_bits=state_bits)
    expected = params0.clone()
    for step in range(10):
        p.grad = torch.randn(n, generator=gen) * ~still
        opt.step()
        expected = expected * torch.tensor(1 - lr * weight_decay, dtype=torch.float32)
        if step == 0:  # every other element took a sign step of lr
            assert (p[~still] != params0[~still]).all()
    state = opt.state[p]
    if state_bits == 32:
        exp_avg = state["exp_avg"]
    else:
        assert layout(state) == {"exp_avg": 8} and state["exp_avg"].code == dynamic_code(True)
        exp_avg = torch.from_numpy(dequantized(state["exp_avg"]))
    assert torch.equal(exp_avg[still], torch.zeros(int(still.sum())))
    assert (exp_avg[~still] != 0).float().mean() > 0.99
    assert torch.equal(p[still], expected[still])
    if weight_decay == 0:
        assert torch.equal(p[still], params0[still])


# --- SGD and Lion through the torch.optim API ---------------------------------------------------

@pytest.mark.parametrize("opt_class, kwargs, error, match", [
    (qo.SGD, dict(momentum=0.9, nesterov=True, dampening=0.1), ValueError, "Nesterov"),
    (qo.SGD, dict(momentum=0.0, nesterov=True), ValueError, "Nesterov"),
    (qo.SGD, dict(momentum=0.9, maximize=True), ValueError, "maximize"),
    (qo.SGD, dict(lr=-1e-3), ValueError, "learning rate"),
    (qo.SGD, dict(momentum=-0.9), ValueError, "momentum"),
    (qo.SGD, dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (qo.SGD, dict(state_bits=16), ValueError, "state_bits"),
    (qo.Lion, dict(lr=-1e-4), ValueError, "learning rate"),
    (qo.Lion, dict(betas=(1.1, 0.99)), ValueError, "betas"),
    (qo.Lion, dict(betas=(0.9, -0.1)), ValueError, "betas"),
    (qo.Lion, dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (qo.Lion, dict(block_size=0), ValueError, "block_size"),
])
def test_bad_arguments_raise(opt_class, kwargs, error, match):
    with pytest.raises(error, match=match):
        opt_class([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_nesterov_with_momentum_and_no_dampening_is_accepted():
    qo.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.9, nesterov=True)


def run_steps(start, grads, make):
    params = [torch.nn.Parameter(s.clone()) for s in start]
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt, params


def test_set_options_momentum_override_equals_param_group():
    """set_options(p, momentum=...) on two of three parameters (one to another momentum, one to none)
    steps exactly as param groups with those momenta, and differently from no override."""
    gen = torch.Generator().manual_seed(15)
    start = [torch.randn(5000, generator=gen), torch.randn(300, generator=gen), torch.randn(4500, generator=gen)]
    grads = [[torch.randn(s.shape, generator=gen) for s in start] for _ in range(4)]

    def with_override(params):
        qo.set_options(params[1], momentum=0.5)
        qo.set_options(params[2], momentum=0.0)
        return qo.SGD(params, lr=1e-2, momentum=0.9, dampening=0.1)

    overridden, opt, params = run_steps(start, grads, with_override)
    grouped, _, _ = run_steps(start, grads, lambda ps: qo.SGD(
        [{"params": [ps[0]]}, {"params": [ps[1]], "momentum": 0.5}, {"params": [ps[2]], "momentum": 0.0}],
        lr=1e-2, momentum=0.9, dampening=0.1))
    plain, _, _ = run_steps(start, grads, lambda ps: qo.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.1))
    for a, b in zip(overridden, grouped):
        assert torch.equal(a, b)
    assert torch.equal(overridden[0], plain[0])
    assert not torch.equal(overridden[1], plain[1]) and not torch.equal(overridden[2], plain[2])
    assert layout(opt.state[params[0]]) == {"momentum_buffer": 8}
    assert layout(opt.state[params[1]]) == {"momentum_buffer": 32}  # 300 elements: below min_8bit_size
    assert layout(opt.state[params[2]]) == {}


def test_momentum_set_later_starts_switches_off_and_resumes_like_torch():
    """Options apply before or after the first step (optimizer.py): momentum 0 for two steps, then
    0.9 (with dampening 0.5) for two, 0 for one, 0.9 again for two. torch starts a buffer from the
    gradient when momentum first becomes non-zero, keeps it unused while momentum is 0, and resumes
    it. 32-bit state: buffers bit-identical to torch's at every step (0.5 * g is exact, so torch's
    FMA rounds like quantlab); parameters within 1 ulp a step (lr 1e-3, |p| ~ 1), so <= 7 (measured 3)."""
    gen = torch.Generator().manual_seed(16)
    start = torch.randn(1000, generator=gen)
    momenta = [0.0, 0.0, 0.9, 0.9, 0.0, 0.9, 0.9]
    grads = [torch.randn(1000, generator=gen) for _ in momenta]
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    opt = qo.SGD([ours], lr=1e-3, dampening=0.5, state_bits=32)
    torch_opt = torch.optim.SGD([theirs], lr=1e-3, dampening=0.5, foreach=False)
    for momentum, g in zip(momenta, grads):
        qo.set_options(ours, momentum=momentum)
        torch_opt.param_groups[0]["momentum"] = momentum
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        assert ("momentum_buffer" in opt.state[ours]) == ("momentum_buffer" in torch_opt.state[theirs])
        if "momentum_buffer" in torch_opt.state[theirs]:
            assert torch.equal(opt.state[ours]["momentum_buffer"], torch_opt.state[theirs]["momentum_buffer"])
    print(f"momentum switched on, off and on: max {ulps_apart(ours, theirs).max().item()} ulps from torch")
    assert ulps_apart(ours, theirs).max().item() <= len(momenta)


def test_momentum_set_later_with_8bit_state():
    """The same switches with an 8-bit buffer: turned on, it starts as the gradient, exactly as a fresh
    optimizer's first step; switched off, the stored buffer is kept as it is and the step is plain
    SGD; switched on again, it continues from that buffer (the reference 8-bit step)."""
    gen = torch.Generator().manual_seed(17)
    n, lr = 5000, 1e-2
    grads = [torch.randn(n, generator=gen) for _ in range(4)]
    p = torch.nn.Parameter(torch.randn(n, generator=gen))
    opt = qo.SGD([p], lr=lr)
    p.grad = grads[0]
    opt.step()
    assert layout(opt.state[p]) == {}

    qo.set_options(p, momentum=0.9)
    fresh = torch.nn.Parameter(p.detach().clone())
    fresh_opt = qo.SGD([fresh], lr=lr, momentum=0.9)
    p.grad, fresh.grad = grads[1], grads[1].clone()
    opt.step()
    fresh_opt.step()
    assert torch.equal(p, fresh)
    assert set(opt.state[p]) == set(fresh_opt.state[fresh]) == {"momentum_buffer", "step"}
    for key in ("momentum_buffer", "step"):
        assert_states_equal(opt.state[p][key], fresh_opt.state[fresh][key], key)

    qo.set_options(p, momentum=0.0)
    kept = {k: clone_state(v) for k, v in opt.state[p].items() if k != "step"}
    before = p.detach().clone()
    p.grad = grads[2]
    opt.step()
    for k, v in kept.items():
        assert_states_equal(opt.state[p][k], v, k)
    assert layout(opt.state[p]) == {"momentum_buffer": 8}
    assert_bits_equal(flat(p), (before - torch.tensor(lr, dtype=torch.float32) * grads[2]).numpy(), "plain step")

    qo.set_options(p, momentum=0.9)
    code = dynamic_code(True)
    step = opt.state[p]["step"] + 1
    expected_p, [(expected_q, expected_absmax)] = reference.step_8bit(
        reference.sgd_update, flat(p).copy(), grads[3].numpy(), [(kept["momentum_buffer"].indices.numpy(),
                                                                 kept["momentum_buffer"].absmax.numpy())],
        [code], 256, reference.sgd_hyperparameters(lr, 0.9, 0.0, 0.0, False, step))
    p.grad = grads[3]
    opt.step()
    assert step > 1 and opt.state[p]["step"] == step
    assert_bits_equal(flat(p), expected_p, "param")
    assert_bits_equal(flat(opt.state[p]["momentum_buffer"].indices), expected_q.reshape(-1), "indices")
    assert_bits_equal(opt.state[p]["momentum_buffer"].absmax.numpy(), expected_absmax, "absmax")


@pytest.mark.parametrize("make", [
    pytest.param(lambda ps: qo.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True), id="sgd"),
    pytest.param(lambda ps: qo.Lion(ps, lr=1e-2, weight_decay=0.1), id="lion"),
])
def test_lr_scheduler_sets_the_effective_lr(make):
    """MultiStepLR(milestones=[2, 3], gamma=0.1): steps 1-2 at 1e-2, step 3 at 1e-3, step 4 at 1e-4,
    the same as setting the group's lr by hand, and different from a constant lr."""
    gen = torch.Generator().manual_seed(18)
    start = torch.randn(5000, generator=gen)
    grads = [torch.randn(5000, generator=gen) for _ in range(4)]

    def run(lr_at_step=None):
        p = torch.nn.Parameter(start.clone())
        opt = make([p])
        scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 3], gamma=0.1) if lr_at_step is None else None
        lrs = []
        for step, g in enumerate(grads, start=1):
            if scheduler is None:
                opt.param_groups[0]["lr"] = lr_at_step(step)
            lrs.append(opt.param_groups[0]["lr"])
            p.grad = g.clone()
            opt.step()
            if scheduler is not None:
                scheduler.step()
        return p.detach(), lrs

    scheduled, lrs = run()
    by_hand, _ = run(lambda s: [1e-2, 1e-2, 1e-2 * 0.1, 1e-2 * 0.1 * 0.1][s - 1])
    constant, _ = run(lambda s: 1e-2)
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3, 1e-4])
    assert torch.equal(scheduled, by_hand)
    assert not torch.equal(scheduled, constant)


@pytest.mark.parametrize("make, state_key", [
    pytest.param(lambda ps: qo.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01, block_size=128),
                 "momentum_buffer", id="sgd"),
    pytest.param(lambda ps: qo.Lion(ps, lr=1e-3, weight_decay=0.1, block_size=128), "exp_avg", id="lion"),
])
def test_state_dict_round_trip_continues_exactly(make, state_key):
    """10 steps, save (weights-only torch.load), load into a model with other weights and a new
    optimizer, 10 more steps: identical to 20 uninterrupted steps, bit for bit, states included (the
    4800-weight layer has an 8-bit state, the rest 32-bit)."""
    model = checkpoint_model(0)
    opt = make(model.parameters())
    checkpoint_steps(model, opt, 10, start=0)
    checkpoint_steps(model, opt, 10, start=10)

    model_a = checkpoint_model(0)
    opt_a = make(model_a.parameters())
    checkpoint_steps(model_a, opt_a, 10, start=0)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b = checkpoint_model(1)
    opt_b = make(model_b.parameters())
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optimizer"])
    checkpoint_steps(model_b, opt_b, 10, start=10)

    assert sum(layout(opt.state[p]) == {state_key: 8} for p in model.parameters()) == 1
    assert sum(layout(opt.state[p]) == {state_key: 32} for p in model.parameters()) == 3
    assert_same_parameters_and_states(model.parameters(), opt, model_b.parameters(), opt_b)


NONFINITE_OPTIMIZERS = [
    pytest.param(lambda ps: qo.SGD(ps, lr=1e-2, momentum=0.9), id="sgd-momentum"),
    pytest.param(lambda ps: qo.SGD(ps, lr=1e-2), id="sgd-plain"),
    pytest.param(lambda ps: qo.Lion(ps, lr=1e-3), id="lion"),
]


@pytest.mark.parametrize("make", NONFINITE_OPTIMIZERS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("index", [0, 1])
def test_nonfinite_gradient_raises_and_changes_nothing(make, value, index):
    """After one finite step (a 32-bit-state and an 8-bit-state parameter), a NaN or Inf in either
    gradient raises before any parameter or state changes."""
    gen = torch.Generator().manual_seed(19)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((100,), (70, 100))]
    opt = make(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[index].grad.view(-1)[-1] = value
    before = snapshot(opt, params)
    with pytest.raises(FloatingPointError):
        opt.step()
    assert_same_snapshot(before, snapshot(opt, params))


# --- a small model ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, make, state_key, trained_below, tolerance", [
    # SGD lr 0.05, momentum 0.9: loss 2.3 -> 0.039-0.050 (seeds 0-4); 8-bit minus 32-bit gaps -0.11% ..
    # +0.70% (seed 0: +0.35%); bound 3%, ~4x the largest. (At lr 0.1 the runs are chaotic: +-30%.)
    pytest.param("sgd", lambda bits: (lambda ps: qo.SGD(ps, lr=0.05, momentum=0.9, state_bits=bits)),
                 "momentum_buffer", 0.1, 0.03, id="sgd"),
    # Lion lr 3e-4 (the paper: 3-10x below AdamW's 1e-3): loss 2.3 -> 0.217-0.239; gaps +0.02% ..
    # +0.25% (seed 0: +0.25%); bound 1.5%, 6x the largest.
    pytest.param("lion", lambda bits: (lambda ps: qo.Lion(ps, lr=3e-4, state_bits=bits)),
                 "exp_avg", 0.3, 0.015, id="lion"),
])
def test_8bit_trains_a_small_model_like_32bit(name, make, state_key, trained_below, tolerance):
    """MLP 32-256-256-10 on test_adam's synthetic 10-class set, 200 steps, batch 128: the
    8-bit run's final full-data loss is within `tolerance` (relative) of the 32-bit run's."""
    assert_8bit_trains_like_32bit(name, make, state_key, trained_below, tolerance)
