"""The fused optimizer step kernels on CUDA against the CPU kernels and quantlab.reference, bit for bit:
every optimizer kind with 1 and 2 states (8-bit and float32), and both LAMB passes.

Under Numba's CUDA simulator (the default suite) each GPU thread runs in Python, so cases are a few
small blocks and few examples; on a GPU (QUANTLAB_GPU_TESTS=1) sizes are full and torch CUDA
tensors on torch's current stream are tested too.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from helpers.kernels import SIGNED_CODES, UNSIGNED_CODES, spread_np
from quantlab import reference
from quantlab.codes import dynamic_code
from quantlab.kernels import cpu
from quantlab.kernels import cuda as cuda_kernels
from quantlab.kernels.lookup import search_tables
from quantlab.kernels.scalar import ADAGRAD, ADAM, LION, RMSPROP, SGD

SIMULATED = bool(numba.config.ENABLE_CUDASIM)
EXAMPLES = 10 if SIMULATED else 50
MAX_BLOCKS = 3 if SIMULATED else 200
BLOCK_SIZES = [1, 7, 33, 64, 256] + ([] if SIMULATED else [1000, 2048, 4096])

# backend: (kernel module, array onto the backend (a copy), array back to the host)
BACKENDS = {"cpu": (cpu, np.copy, np.asarray),
            "cuda": (cuda_kernels, cuda.to_device, lambda a: a.copy_to_host())}

lrs = st.floats(-6, -0.5).map(lambda e: 10.0**e)
betas = st.one_of(st.sampled_from([0.0, 0.9, 0.999]), st.floats(0.0, 0.9999))
epsilons = st.floats(-12, -3).map(lambda e: 10.0**e)
decays = st.one_of(st.just(0.0), st.floats(0.0, 0.5))
steps = st.one_of(st.just(1), st.integers(2, 1000))

# name: (kind, reference update, whether each state is signed, hyperparameters)
OPTIMIZERS = {
    "adam": (ADAM, reference.adam_update, (True, False),
             st.builds(reference.adam_hyperparameters, lrs, betas, betas, epsilons, decays, st.booleans(), steps)),
    "sgd": (SGD, reference.sgd_update, (True,),
            st.builds(reference.sgd_hyperparameters, lrs, betas, betas, decays, st.booleans(), steps)),
    "lion": (LION, reference.lion_update, (True,),
             st.builds(reference.lion_hyperparameters, lrs, betas, betas, decays)),
    "rmsprop": (RMSPROP, reference.rmsprop_update, (False,),
                st.builds(reference.rmsprop_hyperparameters, lrs, betas, epsilons, decays, st.just(0.0),
                          st.just(False))),
    "rmsprop-centred": (RMSPROP, reference.rmsprop_update, (False, True),
                        st.builds(reference.rmsprop_hyperparameters, lrs, betas, epsilons, decays, st.just(0.0),
                                  st.just(True))),
    "rmsprop-momentum": (RMSPROP, reference.rmsprop_update, (False, True),
                         st.builds(reference.rmsprop_hyperparameters, lrs, betas, epsilons, decays,
                                   st.floats(0.01, 0.999), st.just(False))),
    "adagrad": (ADAGRAD, reference.adagrad_update, (False,),
                st.builds(reference.adagrad_hyperparameters, lrs, st.floats(0.0, 1.0), epsilons, decays, steps)),
}
lamb_hyper = st.builds(reference.lamb_hyperparameters, betas, betas, epsilons, decays, steps)


@st.composite
def blocks_and_size(draw):
    """(block_size, n): up to MAX_BLOCKS blocks, the last one often partial."""
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    return block_size, draw(st.integers(1, MAX_BLOCKS * block_size))


@st.composite
def arrays(draw, n, signed_states):
    """param, grad and the states (signed, or >= 0) over many decades with exact zeros; or fresh
    all-zero states."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    zero_fraction = draw(st.sampled_from([0.0, 0.05, 0.5, 0.9]))
    param, grad = spread_np(rng, n, -8, 2, zero_fraction), spread_np(rng, n, -9, 2, zero_fraction)
    if draw(st.booleans()):
        return param, grad, [np.zeros(n, np.float32) for _ in signed_states]
    return param, grad, [spread_np(rng, n, -9, 1, zero_fraction) if signed else
                         np.abs(spread_np(rng, n, -16, 2, zero_fraction)) for signed in signed_states]


def assert_identical(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    unsigned = np.dtype(f"u{actual.dtype.itemsize}")
    mismatch = np.flatnonzero(actual.view(unsigned) != expected.view(unsigned))
    assert mismatch.size == 0, f"{what}: {mismatch.size} elements differ, first at {mismatch[:5]}"


def kernel_state(q, absmax, code):
    """An 8-bit state's kernel arguments: q, absmax, values, search table, zero index."""
    return [q, absmax, code.values, search_tables(code)[0].args(), code.zero_index]


def run_step_8bit(backend, kind, param, grad, quantized, codes, block_size, hyper):
    """backend's step_8bit on copies; returns param and each state's (q, absmax) on the host."""
    module, put, get = backend
    param, grad = put(param), put(grad)
    states = [(put(q), put(absmax)) for q, absmax in quantized]
    args = [arg for (q, absmax), code in zip(states, codes) for arg in kernel_state(q, absmax, code)]
    if len(states) == 1:  # the second slot: empty arrays, the same code
        args += kernel_state(np.zeros(0, np.uint8), np.zeros(0, np.float32), codes[0])
    module.step_8bit(kind, len(states), param, grad, hyper, block_size, *args)
    return [get(param), *(get(a) for state in states for a in state)]


@pytest.mark.parametrize("name", OPTIMIZERS)
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_step_8bit_matches_cpu_and_reference(name, data):
    kind, update, signed_states, hyper = OPTIMIZERS[name]
    hyper = data.draw(hyper, "hyper")
    block_size, n = data.draw(blocks_and_size(), "block_size, n")
    param, grad, states = data.draw(arrays(n, signed_states), "arrays")
    codes = [data.draw(st.sampled_from(SIGNED_CODES if signed else UNSIGNED_CODES), "code")
             for signed in signed_states]
    quantized = [reference.quantize_blockwise(s, code, block_size) for s, code in zip(states, codes)]
    expected_p, expected_states = reference.step_8bit(update, param, grad, quantized, codes, block_size, hyper)
    expected = [expected_p, *(a for state in expected_states for a in state)]
    for backend in BACKENDS:
        result = run_step_8bit(BACKENDS[backend], kind, param, grad, quantized, codes, block_size, hyper)
        for what, actual, exp in zip(["param", "q1", "absmax1", "q2", "absmax2"], result, expected):
            assert_identical(actual, exp, f"{backend} {what}")


def run_step_32bit(backend, kind, param, grad, states, hyper):
    module, put, get = backend
    param, grad, *states = (put(a) for a in (param, grad, *states))
    unused = [put(np.zeros(0, np.float32))] * (2 - len(states))
    module.step_32bit(kind, len(states), param, grad, *states, *unused, hyper)
    return [get(param), *(get(s) for s in states)]


@pytest.mark.parametrize("name", [*OPTIMIZERS, "sgd-without-momentum"])
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_step_32bit_matches_cpu_and_reference(name, data):
    if name == "sgd-without-momentum":  # no state; the reference's buffer comes out as the gradient
        kind, update, signed_states = SGD, lambda p, g, h: reference.sgd_update(p, g, np.zeros_like(p), h)[:1], ()
        hyper = data.draw(st.builds(reference.sgd_hyperparameters, lrs, st.just(0.0), betas, decays, st.just(False),
                                    steps), "hyper")
    else:
        kind, update, signed_states, hyper = OPTIMIZERS[name]
        hyper = data.draw(hyper, "hyper")
    _, n = data.draw(blocks_and_size(), "n")
    param, grad, states = data.draw(arrays(n, signed_states), "arrays")
    expected = update(param, grad, *states, hyper)
    for backend in BACKENDS:
        result = run_step_32bit(BACKENDS[backend], kind, param, grad, states, hyper)
        for what, actual, exp in zip(["param", "s1", "s2"], result, expected):
            assert_identical(actual, exp, f"{backend} {what}")


def run_lamb(backend, param, grad, states, codes, hyper, lr, block_size):
    """Both LAMB passes, the trust ratio as quantlab.optim.LAMB computes it from the partial sums;
    returns the partial sums, param and the states as given (float32, or (q, absmax) pairs)."""
    module, put, get = backend
    param, grad = put(param), put(grad)
    partial = put(np.zeros((reference.num_blocks(param.size, block_size), 2)))
    if codes is None:
        m, v = put(states[0]), put(states[1])
        module.lamb_norms_32bit(param, grad, m, v, hyper, block_size, partial)
    else:
        m, v = (kernel_state(put(q), put(absmax), code) for (q, absmax), code in zip(states, codes))
        module.lamb_norms_8bit(param, grad, *m[:3], *v[:3], hyper, block_size, partial)
    sums = get(partial)
    r_norm, p_norm = math.sqrt(math.fsum(sums[:, 0])), math.sqrt(math.fsum(sums[:, 1]))
    neg_step = np.float32(-lr * (p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0))
    if codes is None:
        module.lamb_apply_32bit(param, grad, m, v, hyper, neg_step)
        return sums, get(param), get(m), get(v)
    module.lamb_apply_8bit(param, grad, *m, *v, hyper, block_size, neg_step)
    return sums, get(param), (get(m[0]), get(m[1])), (get(v[0]), get(v[1]))


@pytest.mark.parametrize("bits", [32, 8])
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), hyper=lamb_hyper, lr=lrs, signed=st.sampled_from(SIGNED_CODES),
       unsigned=st.sampled_from(UNSIGNED_CODES))
def test_lamb_passes_match_cpu_and_reference(bits, data, hyper, lr, signed, unsigned):
    block_size, n = data.draw(blocks_and_size(), "block_size, n")
    param, grad, states = data.draw(arrays(n, (True, False)), "arrays")
    codes = (signed, unsigned) if bits == 8 else None
    if codes:
        states = [reference.quantize_blockwise(s, code, block_size) for s, code in zip(states, codes)]
    expected_p, expected_m, expected_v = reference.lamb_step(param, grad, *states, hyper, lr, block_size, codes)
    cpu_sums, *cpu_result = run_lamb(BACKENDS["cpu"], param, grad, states, codes, hyper, lr, block_size)
    cuda_sums, *cuda_result = run_lamb(BACKENDS["cuda"], param, grad, states, codes, hyper, lr, block_size)
    assert_identical(cuda_sums, cpu_sums, "partial sums")
    flat = (lambda p, m, v: [p, *m, *v]) if codes else (lambda p, m, v: [p, m, v])
    names = ["param", "m", "m absmax", "v", "v absmax"] if codes else ["param", "m", "v"]
    for what, cpu_a, cuda_a, exp in zip(names, flat(*cpu_result), flat(*cuda_result),
                                        flat(expected_p, expected_m, expected_v)):
        assert_identical(cpu_a, exp, f"cpu {what}")
        assert_identical(cuda_a, exp, f"cuda {what}")


def test_block_size_beyond_shared_memory_raises():
    code = SIGNED_CODES[0]
    x = cuda.to_device(np.zeros(8, np.float32))
    state = kernel_state(cuda.to_device(np.zeros(8, np.uint8)), cuda.to_device(np.zeros(1, np.float32)), code)
    with pytest.raises(ValueError, match="block sizes from 1 to 4096"):
        cuda_kernels.step_8bit(SGD, 1, x, x, np.zeros(6, np.float32), 8192, *state, *state)


def test_read_only_constants_are_copied_once():
    """Code values and search tables (read-only NumPy arrays) go to the device once per padding;
    writable host arrays on every call."""
    code = dynamic_code(True, 4)
    values = cuda_kernels.constant_on_device(code.values, 0)
    padded = cuda_kernels.constant_on_device(code.values, 0, pad_to=256)
    assert cuda_kernels.constant_on_device(code.values, 0) is values
    assert cuda_kernels.constant_on_device(code.values, 0, pad_to=256) is padded
    assert_identical(values.copy_to_host(), code.values, "values")
    expected = np.full(256, np.nan, np.float32)
    expected[: len(code)] = code.values
    assert_identical(padded.copy_to_host(), expected, "padded values")
    writable = code.values.copy()
    assert cuda_kernels.constant_on_device(writable, 0) is not cuda_kernels.constant_on_device(writable, 0)


@pytest.mark.skipif(SIMULATED, reason="torch CUDA tensors need a GPU")
def test_torch_tensors_on_the_current_stream():
    """Adam's 8-bit step on torch CUDA tensors, launched on a side stream as quantlab's backends do."""
    import torch

    from quantlab.kernels import _cuda_stream

    n, block_size = 2**22 + 3, 256
    signed, unsigned = SIGNED_CODES[0], UNSIGNED_CODES[0]
    rng = np.random.default_rng(0)
    param, grad, m = (spread_np(rng, n, low, high, 0.05) for low, high in [(-8, 2), (-9, 2), (-9, 1)])
    v = np.abs(spread_np(rng, n, -16, 2, 0.05))
    quantized = [reference.quantize_blockwise(m, signed, block_size),
                 reference.quantize_blockwise(v, unsigned, block_size)]
    hyper = reference.adam_hyperparameters(1e-3, 0.9, 0.999, 1e-8, 0.01, True, 7)
    expected = run_step_8bit(BACKENDS["cpu"], ADAM, param, grad, quantized, [signed, unsigned], block_size, hyper)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        tensors = [torch.from_numpy(a).cuda() for a in (param, grad, *quantized[0], *quantized[1])]
        cuda_kernels.step_8bit(ADAM, 2, *tensors[:2], hyper, block_size, *kernel_state(*tensors[2:4], signed),
                               *kernel_state(*tensors[4:], unsigned), stream=_cuda_stream())
    stream.synchronize()
    for what, actual, exp in zip(["param", "q1", "absmax1", "q2", "absmax2"], [tensors[0], *tensors[2:]], expected):
        assert_identical(actual.cpu().numpy(), exp, what)
