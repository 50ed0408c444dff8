"""States below 8 bits on CUDA, bit for bit against quantlab.reference (and the CPU kernels where
that costs no extra compilation): packed indices, packed block-wise steps (Adam, RMSprop, LAMB's two
passes), rank-1 normalisation's quantizers and steps, zero rows and columns.

Under Numba's CUDA simulator (the default suite) each GPU thread runs in Python, so cases are a few
small blocks and few examples; on a GPU (QUANTLAB_GPU_TESTS=1) sizes are larger.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from helpers.kernels import assert_bits_equal, spread_np
from quantlab import reference
from quantlab.codes import dynamic_code, linear_code
from quantlab.kernels import cpu
from quantlab.kernels import cuda as cuda_kernels
from quantlab.kernels.lookup import search_tables, step_values
from quantlab.kernels.scalar import ADAM, RMSPROP

SIMULATED = bool(numba.config.ENABLE_CUDASIM)
EXAMPLES = 10 if SIMULATED else 50
MAX_BLOCKS = 3 if SIMULATED else 50
MAX_SIDE = (6, 12) if SIMULATED else (300, 700)  # rows, columns of a rank-1 state
BLOCK_SIZES = [4, 12, 32, 100] + ([] if SIMULATED else [256, 1000, 4096])  # multiples of every per_byte

SIGNED = {2: [dynamic_code(True, 2)], 4: [dynamic_code(True, 4), linear_code(4, True)], 8: [dynamic_code(True)]}
UNSIGNED = {2: [dynamic_code(False, 2), linear_code(2, signed=False, include_zero=False)],
            4: [dynamic_code(False, 4), dynamic_code(False, 4, include_zero=False),
                linear_code(4, signed=False, include_zero=False)],
            8: [dynamic_code(False)]}

lrs = st.floats(-6, -0.5).map(lambda e: 10.0**e)
betas = st.one_of(st.sampled_from([0.0, 0.9, 0.999]), st.floats(0.0, 0.9999))
epsilons = st.floats(-12, -3).map(lambda e: 10.0**e)
decays = st.one_of(st.just(0.0), st.floats(0.0, 0.5))
steps = st.integers(1, 1000)
adam_hyper = st.builds(reference.adam_hyperparameters, lrs, betas, betas, epsilons, decays, st.booleans(), steps)
rmsprop_hyper = st.builds(reference.rmsprop_hyperparameters, lrs, betas, epsilons, decays, st.just(0.0),
                          st.just(False))
lamb_hyper = st.builds(reference.lamb_hyperparameters, betas, betas, epsilons, decays, steps)


def per_byte(code, packed=True) -> int:
    return reference.indices_per_byte(code.bits) if packed else 1


def code_of(draw, signed, bits):
    return draw(st.sampled_from((SIGNED if signed else UNSIGNED)[bits]))


@st.composite
def step_arrays(draw, shape, signed_states):
    """param, grad and the states over many decades with exact zeros (or fresh all-zero states); for
    a matrix, often a zero row and a zero column in all of them (zero new states there)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = math.prod(shape)
    zero_fraction = draw(st.sampled_from([0.0, 0.05, 0.5]))
    arrays = [spread_np(rng, n, -8, 2, zero_fraction), spread_np(rng, n, -9, 2, zero_fraction)]
    fresh = draw(st.booleans())
    arrays += [np.zeros(n, np.float32) if fresh else spread_np(rng, n, -9, 1, zero_fraction) if signed else
               np.abs(spread_np(rng, n, -16, 2, zero_fraction)) for signed in signed_states]
    arrays = [a.reshape(shape) for a in arrays]
    if len(shape) == 2 and draw(st.booleans()):
        row, col = draw(st.integers(0, shape[0] - 1)), draw(st.integers(0, shape[1] - 1))
        for a in arrays:
            a[row], a[:, col] = 0, 0
    return arrays


def kernel_state(stored, fmt, put):
    """A stored state (reference format) as step_rank1 takes it: (q, scale_a, scale_b, values,
    search, zero, per_byte), scale_b empty for a block-wise state."""
    q, scale_a, *scale_b = stored
    scale_b = scale_b[0] if scale_b else np.zeros(0, np.float32)
    code = fmt.code
    return (put(np.ascontiguousarray(q).reshape(-1)), put(scale_a), put(scale_b), step_values(code),
            search_tables(code)[0].args(), code.zero_index, per_byte(code, fmt.packed))


def assert_state(actual, expected, what):
    """A kernel state (q, scale_a, scale_b, ...) on the device equals a stored reference state."""
    assert_bits_equal(actual[0].copy_to_host(), np.ascontiguousarray(expected[0]).reshape(-1), f"{what} indices")
    for k, name in ((1, "scale a"), (2, "scale b"))[:len(expected) - 1]:
        assert_bits_equal(actual[k].copy_to_host(), expected[k], f"{what} {name}")


def run_step(kind, param, grad, stored, formats, hyper, block_size):
    """cuda step_8bit (block-wise states) or step_rank1 on device copies; returns param and the states."""
    param_d, grad_d = cuda.to_device(param.reshape(-1)), cuda.to_device(grad.reshape(-1))
    states = [kernel_state(s, f, cuda.to_device) for s, f in zip(stored, formats)]
    second = states[-1]
    if all(isinstance(f, reference.Blockwise) for f in formats):
        (q1, a1, _, *code1, pb1), (q2, a2, _, *code2, pb2) = states[0], second
        cuda_kernels.step_8bit(kind, len(states), param_d, grad_d, hyper, block_size, q1, a1, *code1, q2, a2, *code2,
                               per_byte=(pb1, pb2))
    else:
        cuda_kernels.step_rank1(kind, len(states), param_d, grad_d, hyper, block_size, states[0], second)
    return param_d.copy_to_host(), states


# --- packed indices --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4])
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_pack_and_unpack_match_reference_and_cpu(bits, data):
    n = data.draw(st.integers(1, 70 if SIMULATED else 100_000), "n")
    q = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).integers(0, 2**bits, n).astype(np.uint8)
    k, expected = reference.indices_per_byte(bits), reference.pack_indices(q, bits)
    packed = cuda.device_array(expected.size, np.uint8)
    cuda_kernels.pack_indices(cuda.to_device(q), k, packed)
    assert_bits_equal(packed.copy_to_host(), expected, "cuda packed")
    cpu_packed = np.empty_like(expected)
    cpu.pack_indices(q, k, cpu_packed)
    assert_bits_equal(cpu_packed, expected, "cpu packed")
    unpacked = cuda.device_array(n, np.uint8)
    cuda_kernels.unpack_indices(cuda.to_device(expected), k, unpacked)
    assert_bits_equal(unpacked.copy_to_host(), reference.unpack_indices(expected, bits, n), "unpacked")


# --- packed block-wise steps -----------------------------------------------------------------------

@st.composite
def blocks_and_size(draw):
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    return block_size, draw(st.integers(1, MAX_BLOCKS * block_size))


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_packed_step_8bit_matches_reference(name, data):
    """Adam's m of 2, 4 or 8 bits with v of 2 or 4 (two per_byte at once); RMSprop's one state of 2 or 4."""
    kind, update, signed_states, hyper = {"adam": (ADAM, reference.adam_update, (True, False), adam_hyper),
                                          "rmsprop": (RMSPROP, reference.rmsprop_update, (False,), rmsprop_hyper)}[name]
    hyper = data.draw(hyper, "hyper")
    block_size, n = data.draw(blocks_and_size(), "block_size, n")
    bits = [data.draw(st.sampled_from([2, 4, 8] if k == 0 and len(signed_states) == 2 else [2, 4]), "bits")
            for k in range(len(signed_states))]
    formats = [reference.Blockwise(code_of(data.draw, signed, b), block_size, packed=True)
               for signed, b in zip(signed_states, bits)]
    param, grad, *states = data.draw(step_arrays((n,), signed_states), "arrays")
    stored = [f.quantize(s) for s, f in zip(states, formats)]
    expected_p, expected_states = reference.step_quantized(update, param, grad, stored, formats, hyper)
    param_k, states_k = run_step(kind, param, grad, stored, formats, hyper, block_size)
    assert_bits_equal(param_k, expected_p, "param")
    for k, (actual, expected) in enumerate(zip(states_k, expected_states)):
        assert_state(actual, expected, f"state {k + 1}")


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), hyper=lamb_hyper, lr=lrs)
def test_packed_lamb_passes_match_reference(data, hyper, lr):
    block_size, n = data.draw(blocks_and_size(), "block_size, n")
    codes = (code_of(data.draw, True, data.draw(st.sampled_from([2, 4]))),
             code_of(data.draw, False, data.draw(st.sampled_from([2, 4]))))
    param, grad, m, v = data.draw(step_arrays((n,), (True, False)), "arrays")
    states = [reference.quantize_blockwise(s, code, block_size) for s, code in zip((m, v), codes)]
    expected_p, *expected_states = reference.lamb_step(param, grad, *states, hyper, lr, block_size, codes)
    pb = tuple(per_byte(code) for code in codes)
    m_k, v_k = ([cuda.to_device(reference.pack_indices(q, code.bits)), cuda.to_device(absmax), code.values,
                 search_tables(code)[0].args(), code.zero_index] for (q, absmax), code in zip(states, codes))
    param_d, grad_d = cuda.to_device(param), cuda.to_device(grad)
    partial = cuda.to_device(np.zeros((reference.num_blocks(n, block_size), 2)))
    cuda_kernels.lamb_norms_8bit(param_d, grad_d, *m_k[:3], *v_k[:3], hyper, block_size, partial, per_byte=pb)
    sums = partial.copy_to_host()
    r_norm, p_norm = math.sqrt(math.fsum(sums[:, 0])), math.sqrt(math.fsum(sums[:, 1]))
    neg_step = np.float32(-lr * (p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0))
    cuda_kernels.lamb_apply_8bit(param_d, grad_d, *m_k, *v_k, hyper, block_size, neg_step, per_byte=pb)
    assert_bits_equal(param_d.copy_to_host(), expected_p, "param")
    for (q, absmax, *_), (expected_q, expected_absmax), code, what in zip((m_k, v_k), expected_states, codes, "mv"):
        assert_bits_equal(q.copy_to_host(), reference.pack_indices(expected_q, code.bits), f"{what} indices")
        assert_bits_equal(absmax.copy_to_host(), expected_absmax, f"{what} absmax")


# --- rank-1 normalisation --------------------------------------------------------------------------

def rank1_both(x, code, packed):
    """(cuda, cpu) quantize_rank1 then dequantize_rank1 of the matrix x: each (q, row_max, col_max, values)."""
    rows, cols = x.shape
    flat, k = x.reshape(-1), per_byte(code, packed)
    results = []
    for module, put, get in ((cuda_kernels, cuda.to_device, lambda a: a.copy_to_host()),
                             (cpu, np.copy, np.asarray)):
        q, row_max, col_max, out = (put(np.zeros(size, dtype)) for size, dtype in (
            (-(-flat.size // k), np.uint8), (rows, np.float32), (cols, np.float32), (flat.size, np.float32)))
        module.quantize_rank1(put(flat), put(flat.view(np.int32)), search_tables(code)[0].args(), code.zero_index, k,
                              q, row_max, col_max)
        module.dequantize_rank1(q, row_max, col_max, step_values(code), k, out)
        results.append([get(a) for a in (q, row_max, col_max, out)])
    return results


def check_rank1_quantizers(x, code, packed):
    expected_q, row_max, col_max = reference.quantize_rank1(x, code)
    expected_values = reference.dequantize_rank1(expected_q, row_max, col_max, code).reshape(-1)
    expected_q = reference.pack_indices(expected_q, code.bits) if packed else expected_q.reshape(-1)
    for backend, result in zip(("cuda", "cpu"), rank1_both(x, code, packed)):
        for what, actual, expected in zip(("q", "row_max", "col_max", "values"), result,
                                          (expected_q, row_max, col_max, expected_values)):
            assert_bits_equal(actual, expected, f"{backend} {what}")


matrix_shapes = st.tuples(st.integers(1, MAX_SIDE[0]), st.integers(1, MAX_SIDE[1]))


@settings(max_examples=3 * EXAMPLES, deadline=None)
@given(data=st.data(), shape=matrix_shapes, signed=st.booleans(), bits=st.sampled_from([2, 4, 8]), packed=st.booleans())
def test_rank1_quantizers_match_reference_and_cpu(data, shape, signed, bits, packed):
    x = data.draw(step_arrays(shape, (signed,)), "arrays")[2]
    check_rank1_quantizers(x, code_of(data.draw, signed, bits), packed)


RANK1_CASES = {"m block-wise, v rank-1": (False, True), "both rank-1": (True, True)}


@pytest.mark.parametrize("case", RANK1_CASES)
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), hyper=adam_hyper, shape=matrix_shapes)
def test_step_rank1_matches_reference(case, data, hyper, shape):
    """Adam with rank-1 v (and m), each state's indices packed or not, 2 to 8 bits."""
    block_size = data.draw(st.sampled_from(BLOCK_SIZES))
    formats = []
    for signed, rank1 in zip((True, False), RANK1_CASES[case]):
        code = code_of(data.draw, signed, data.draw(st.sampled_from([2, 4, 8])))
        packed = data.draw(st.booleans())
        formats.append(reference.Rank1(code, packed) if rank1 else reference.Blockwise(code, block_size, packed))
    param, grad, m, v = data.draw(step_arrays(shape, (True, False)), "arrays")
    check_step_rank1(param, grad, m, v, formats, hyper, block_size)


def check_step_rank1(param, grad, m, v, formats, hyper, block_size):
    stored = [f.quantize(s) for s, f in zip((m, v), formats)]
    expected_p, expected_states = reference.step_quantized(reference.adam_update, param, grad, stored, formats, hyper)
    param_k, states_k = run_step(ADAM, param, grad, stored, formats, hyper, block_size)
    assert_bits_equal(param_k, expected_p.reshape(-1), "param")
    for actual, expected, what in zip(states_k, expected_states, ("m", "v")):
        assert_state(actual, expected, what)


def test_zero_rows_and_columns():
    """Zero rows and columns store the zero index (the smallest value of a zero-free code) with
    maxima 0, in the quantizers and in a step whose new states are zero there; an all-zero matrix too."""
    rng = np.random.default_rng(7)
    rows, cols = 5, 6
    arrays = [spread_np(rng, rows * cols, -6, 1, 0.1).reshape(rows, cols) for _ in range(4)]
    arrays[3] = np.abs(arrays[3])
    for a in arrays:
        a[1], a[3], a[:, 0], a[:, 4] = 0, 0, 0, 0
    param, grad, m, v = arrays
    zero_free = linear_code(4, signed=False, include_zero=False)
    for code, packed in ((dynamic_code(True, 4), True), (zero_free, True), (dynamic_code(False, 2), False)):
        check_rank1_quantizers(m if code.signed else v, code, packed)
    check_rank1_quantizers(np.zeros((3, 4), np.float32), zero_free, True)
    hyper = reference.adam_hyperparameters(1e-3, 0.9, 0.999, 1e-8, 0.1, True, 5)
    formats = [reference.Rank1(dynamic_code(True, 4), True), reference.Rank1(zero_free, True)]
    check_step_rank1(param, grad, m, v, formats, hyper, 4)
    stored = [f.quantize(s) for s, f in zip((m, v), formats)]
    _, (_, (q, row_max, col_max)) = reference.step_quantized(reference.adam_update, param, grad, stored, formats, hyper)
    assert not row_max[[1, 3]].any() and not col_max[[0, 4]].any()
    assert (reference.unpack_indices(q, 4, rows * cols).reshape(rows, cols)[[1, 3]] == zero_free.zero_index).all()


def test_step_rank1_needs_a_rank1_state():
    code = dynamic_code(True, 4)
    x = cuda.to_device(np.zeros(8, np.float32))
    state = (cuda.to_device(np.zeros(4, np.uint8)), cuda.to_device(np.zeros(2, np.float32)), np.zeros(0, np.float32),
             code.values, search_tables(code)[0].args(), code.zero_index, 2)
    with pytest.raises(ValueError, match="needs a rank-1 state"):
        cuda_kernels.step_rank1(ADAM, 2, x, x, np.zeros(8, np.float32), 4, state, state)
    with pytest.raises(ValueError, match="whole bytes"):
        cuda_kernels.step_rank1(ADAM, 2, x, x, np.zeros(8, np.float32), 5, state, state)
