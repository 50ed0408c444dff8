"""quantlab.optim.LARS: Algorithm 1 of You, Gitman & Ginsburg (2017) with 8-bit or 32-bit momentum."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import quantlab.optim as qo
from quantlab import reference
from quantlab.codes import dynamic_code
from quantlab.optim.lars import trust_ratio


def transcription(w, grads, lr, momentum, weight_decay, eta):
    """The paper's Algorithm 1 in float32 torch ops, one line per line of the paper."""
    w, v = w.clone(), torch.zeros_like(w)
    for g in grads:
        w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
        local_lr = eta * float(w_norm) / (float(g_norm) + weight_decay * float(w_norm))
        v = momentum * v + (lr * local_lr) * (g + weight_decay * w)
        w = w - v
    return w


def run(opt, p, grads):
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_32bit_equals_the_papers_algorithm(weight_decay):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(3000, generator=gen)
    grads = [torch.randn(3000, generator=gen) * 0.1 for _ in range(20)]
    p = torch.nn.Parameter(w0.clone())
    ours = run(qo.LARS([p], lr=0.5, momentum=0.9, weight_decay=weight_decay, trust_coefficient=0.02,
                       state_bits=32), p, grads)
    expected = transcription(w0, grads, 0.5, 0.9, weight_decay, 0.02)
    # Same float32 operations in the same order (each torch op rounds once): bit for bit.
    assert torch.equal(ours, expected)


def test_8bit_steps_are_the_reference_steps():
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(5000, generator=gen))
    opt = qo.LARS([p], lr=0.3, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01)
    code = dynamic_code(True)
    param = p.detach().numpy().copy()
    states = [reference.quantize_blockwise(np.zeros(5000, np.float32), code, 256)]
    for _ in range(3):
        g = torch.randn(5000, generator=gen)
        ratio = trust_ratio(torch.from_numpy(param), g, 0.01, 1e-4)
        p.grad = g.clone()
        opt.step()
        hyper = reference.lars_hyperparameters(0.3, 0.9, 1e-4, ratio)
        param, states = reference.step_8bit(reference.sgd_update, param, g.numpy(), states, [code], 256, hyper)
        np.testing.assert_array_equal(p.detach().numpy().view(np.uint32), param.view(np.uint32))
        np.testing.assert_array_equal(opt.state[p]["momentum_buffer"].indices.numpy(), states[0][0])


def test_trust_ratio_scales_the_first_step_with_8bit_state_too():
    """From a zero buffer the first step is w - lr * ratio * (g + wd * w), before any quantization."""
    gen = torch.Generator().manual_seed(2)
    w0, g = torch.randn(8192, generator=gen) * 3, torch.randn(8192, generator=gen)
    for bits in (8, 32):
        p = torch.nn.Parameter(w0.clone())
        run(qo.LARS([p], lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.001, state_bits=bits), p, [g])
        ratio = 0.001 * float(w0.norm()) / (float(g.norm()) + 1e-3 * float(w0.norm()))
        assert ratio < 0.01  # the trust ratio, not the raw lr of 1.0, sets the step
        expected = w0 - (1.0 * ratio) * (g + 1e-3 * w0)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_trust_ratio_is_one_for_zero_norms_and_when_excluded():
    assert trust_ratio(torch.zeros(10), torch.ones(10), 0.001, 0.0) == 1.0
    assert trust_ratio(torch.ones(10), torch.zeros(10), 0.001, 0.0) == 1.0
    gen = torch.Generator().manual_seed(3)
    w0, g = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    lars, sgd = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    run(qo.LARS([lars], lr=0.1, momentum=0.9, trust_coefficient=None, state_bits=32), lars, [g, g])
    run(qo.SGD([sgd], lr=0.1, momentum=0.9, state_bits=32), sgd, [g, g])
    # The same maths, rounded differently: LARS keeps lr inside its buffer (v = m v + lr g; w -= v),
    # SGD outside (v = m v + g; w -= lr v); a few float32 roundings apart after two steps.
    torch.testing.assert_close(lars.detach(), sgd.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(lars.detach(), w0)


def test_8bit_stays_close_to_32bit():
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(2**16, generator=gen)
    grads = [torch.randn(2**16, generator=gen) for _ in range(20)]
    changes = {}
    for bits in (8, 32):
        p = torch.nn.Parameter(w0.clone())
        changes[bits] = run(qo.LARS([p], lr=1.0, trust_coefficient=0.001, state_bits=bits), p, grads) - w0
    deviation = float((changes[8] - changes[32]).norm() / changes[32].norm())
    assert deviation < 0.02, deviation  # measured 0.4% (the momentum buffer's 8-bit rounding)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(momentum=1.0), dict(weight_decay=-1.0),
                                    dict(trust_coefficient=0.0)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        qo.LARS([torch.nn.Parameter(torch.zeros(3))], **kwargs)
