"""The CPU kernels for states below 8 bits against the NumPy reference, bit for bit: packing, rank-1
normalisation, and the fused steps (``step_8bit`` with packed indices, ``step_rank1``) for every
state width from 2 to 8 bits and every optimizer kind.

Which kernels compile is bounded on purpose (each variant costs seconds on a fresh clone): every
width for Adam, and 4 bits (two indices a byte) for the other kinds; widths 3, 5, 6, 7 take one index
a byte, the 8-bit kernels themselves.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.kernels import assert_bits_equal, spread_np
from quantlab import reference
from quantlab.codes import dynamic_code, linear_code
from quantlab.kernels import cpu, scalar
from quantlab.kernels.lookup import search_tables, step_values

STEP_EXAMPLES = 150


def codes_for(bits: int, signed: bool, variant: int):
    """A code of ``bits`` bits: dynamic or linear; unsigned ones also zero-free."""
    if signed:
        return (dynamic_code(True, bits), linear_code(bits, True))[variant % 2]
    return (dynamic_code(False, bits), linear_code(bits, False), linear_code(bits, False, include_zero=False),
            dynamic_code(False, bits, include_zero=False))[variant % 4]


# name: (kind, reference update, signedness of each state, hyperparameters from a uniform draw u)
OPTIMIZERS = {
    "adam": (scalar.ADAM, reference.adam_update, (True, False),
             lambda u, step: reference.adam_hyperparameters(10 ** (-4 + 3 * u), 0.9, 0.999, 1e-8, u / 10, u > 0.5,
                                                            step)),
    "sgd": (scalar.SGD, reference.sgd_update, (True,),
            lambda u, step: reference.sgd_hyperparameters(0.1 * u, 0.9, 0.0, u / 10, u > 0.5, step)),
    "lion": (scalar.LION, reference.lion_update, (True,),
             lambda u, step: reference.lion_hyperparameters(1e-3 * u, 0.9, 0.99, u)),
    "rmsprop-centred": (scalar.RMSPROP, reference.rmsprop_update, (False, True),
                        lambda u, step: reference.rmsprop_hyperparameters(1e-2 * u, 0.99, 1e-8, 0.0, 0.0, True)),
    "adagrad": (scalar.ADAGRAD, reference.adagrad_update, (False,),
                lambda u, step: reference.adagrad_hyperparameters(0.1 * u, 0.0, 1e-10, u / 10, step)),
}
CASES = [("adam", bits) for bits in range(2, 9)] + [(name, 4) for name in OPTIMIZERS if name != "adam"]


def states_for(rng, signs, n, zero_fraction):
    """Initial float32 states: signed ones spread over decades, non-negative ones their squares."""
    return [spread_np(rng, n, -6, 0, zero_fraction) if signed else spread_np(rng, n, -6, 0, zero_fraction) ** 2
            for signed in signs]


def kernel_state(stored, fmt) -> tuple:
    """One stored state as step_rank1 takes it: (q, scale_a, scale_b, values, search, zero, per_byte)."""
    code = fmt.code
    per_byte = reference.indices_per_byte(code.bits) if fmt.packed else 1
    q, *scales = (np.ascontiguousarray(a).reshape(-1).copy() for a in stored)
    scale_b = scales[1] if len(scales) == 2 else np.zeros(0, np.float32)
    return q, scales[0], scale_b, step_values(code), search_tables(code)[0].args(), code.zero_index, per_byte


@settings(max_examples=300, deadline=None)
@given(bits=st.sampled_from([2, 4]), n=st.integers(0, 20_000), seed=st.integers(0, 2**32 - 1))
def test_pack_and_unpack_equal_the_reference(bits, n, seed):
    q = np.random.default_rng(seed).integers(0, 2**bits, n).astype(np.uint8)
    per_byte = reference.indices_per_byte(bits)
    packed = np.empty(reference.packed_size(n, bits), np.uint8)
    cpu.pack_indices(q, per_byte, packed)
    assert_bits_equal(packed, reference.pack_indices(q, bits), "packed")
    unpacked = np.empty(n, np.uint8)
    cpu.unpack_indices(packed, per_byte, unpacked)
    assert_bits_equal(unpacked, q, "unpacked")


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 70), cols=st.integers(1, 70), variant=st.integers(0, 7),
       packed=st.booleans(), zero_fraction=st.sampled_from([0.0, 0.3, 0.95]), seed=st.integers(0, 2**32 - 1))
def test_rank1_quantize_and_dequantize_equal_the_reference(bits, rows, cols, variant, packed, zero_fraction, seed):
    rng = np.random.default_rng(seed)
    code = codes_for(bits, variant % 2 == 0, variant // 2)
    x = spread_np(rng, rows * cols, -8, 3, zero_fraction)
    if not code.signed:
        x = np.abs(x)
    if variant % 3 == 0 and rows > 1:
        x.reshape(rows, cols)[rng.integers(rows)] = 0  # an all-zero row: scale 0 for all of it
    packed = packed and bits in reference.PACKED_BITS
    per_byte = reference.indices_per_byte(bits) if packed else 1
    q = np.empty(-(-x.size // per_byte), np.uint8)
    row_max, col_max = np.empty(rows, np.float32), np.empty(cols, np.float32)
    cpu.quantize_rank1(x, x.view(np.int32), search_tables(code)[0].args(), code.zero_index, per_byte, q, row_max,
                       col_max)
    fmt = reference.Rank1(code, packed)
    expected = fmt.quantize(x.reshape(rows, cols))
    for actual, wanted, what in zip((q, row_max, col_max), expected, ("q", "row_max", "col_max")):
        assert_bits_equal(actual, np.ascontiguousarray(wanted).reshape(-1), what)
    out = np.empty(x.size, np.float32)
    cpu.dequantize_rank1(q, row_max, col_max, step_values(code), per_byte, out)
    assert_bits_equal(out, fmt.dequantize(expected, (rows, cols)).reshape(-1), "dequantized")


@settings(max_examples=STEP_EXAMPLES, deadline=None)
@given(case=st.sampled_from(CASES), rows=st.integers(1, 60), cols=st.integers(1, 60), variant=st.integers(0, 7),
       blocks_of=st.sampled_from([4, 8, 64, 128, 256]), zero_fraction=st.sampled_from([0.0, 0.3, 0.95]),
       rank1=st.sampled_from([(False, False), (False, True), (True, True)]), u=st.floats(0.01, 1.0),
       step=st.integers(1, 100), seed=st.integers(0, 2**32 - 1))
def test_fused_steps_equal_the_reference(case, rows, cols, variant, blocks_of, zero_fraction, rank1, u, step, seed):
    """One step of every kind at every width, block-wise (step_8bit, indices packed for 2 and 4 bits)
    or with rank-1 states (step_rank1), equals reference.step_quantized bit for bit."""
    name, bits = case
    kind, update, signs, hyper_of = OPTIMIZERS[name]
    rng = np.random.default_rng(seed)
    n, shape = rows * cols, (rows, cols)
    packed = bits in reference.PACKED_BITS
    # rank-1 for unsigned states (one-state kinds, Adam's v); both of Adam's at 4 bits
    if len(signs) == 1:
        rank1 = (rank1[1] and not signs[0],)
    elif name != "adam" or (rank1[0] and bits != 4):
        rank1 = (False, rank1[1] and name == "adam")
    formats = [reference.Rank1(codes_for(bits, s, variant), packed) if r else
               reference.Blockwise(codes_for(bits, s, variant), blocks_of, packed) for s, r in zip(signs, rank1)]
    param, grad = spread_np(rng, n, -3, 1, 0.0), spread_np(rng, n, -6, 1, zero_fraction)
    stored = [f.quantize(x.reshape(shape)) for f, x in zip(formats, states_for(rng, signs, n, zero_fraction))]
    hyper = hyper_of(u, step)
    expected_p, expected_states = reference.step_quantized(update, param.reshape(shape), grad.reshape(shape), stored,
                                                           formats, hyper)
    args = [kernel_state(s, f) for s, f in zip(stored, formats)]
    p = param.copy()
    if any(rank1):
        cpu.step_rank1(kind, len(args), p, grad.copy(), hyper, blocks_of, args[0], args[-1])
    else:
        (q1, a1, _, values1, search1, zero1, pb1), (q2, a2, _, values2, search2, zero2, pb2) = args[0], args[-1]
        cpu.step_8bit(kind, len(args), p, grad.copy(), hyper, blocks_of, q1, a1, values1, search1, zero1,
                      q2, a2, values2, search2, zero2, per_byte=(pb1, pb2))
    assert_bits_equal(p, expected_p.reshape(-1), "param")
    for k, (arg, wanted) in enumerate(zip(args, expected_states)):
        arrays = arg[:3] if len(wanted) == 3 else arg[:2]
        for actual, w, what in zip(arrays, wanted, ("q", "scale", "column maxima")):
            assert_bits_equal(actual, np.ascontiguousarray(w).reshape(-1), f"state {k + 1} {what}")


def test_packed_lamb_passes_equal_the_reference():
    """LAMB's two passes with 4-bit packed block-wise states: as reference.lamb_step on the unpacked ones."""
    rng = np.random.default_rng(0)
    n, block_size, signed, unsigned = 1000, 64, dynamic_code(True, 4), linear_code(4, False, include_zero=False)
    param, grad = spread_np(rng, n, -3, 1, 0.0), spread_np(rng, n, -6, 1, 0.1)
    m_q, m_absmax = reference.quantize_blockwise(spread_np(rng, n, -6, 0, 0.1), signed, block_size)
    v_q, v_absmax = reference.quantize_blockwise(spread_np(rng, n, -6, 0, 0.1) ** 2, unsigned, block_size)
    hyper, lr = reference.lamb_hyperparameters(0.9, 0.999, 1e-6, 0.01, 3), 1e-3
    expected = reference.lamb_step(param, grad, (m_q, m_absmax), (v_q, v_absmax), hyper, lr, block_size,
                                   (signed, unsigned))
    packed = [reference.pack_indices(q, 4) for q in (m_q, v_q)]
    partial = np.zeros((reference.num_blocks(n, block_size), 2))
    cpu.lamb_norms_8bit(param, grad, packed[0], m_absmax, step_values(signed), packed[1], v_absmax,
                        step_values(unsigned), hyper, block_size, partial, per_byte=(2, 2))
    r_norm, p_norm = math.sqrt(math.fsum(partial[:, 0])), math.sqrt(math.fsum(partial[:, 1]))
    neg_step = np.float32(-lr * p_norm / r_norm)  # as quantlab.optim.LAMB computes it
    p = param.copy()
    cpu.lamb_apply_8bit(p, grad, packed[0], m_absmax, step_values(signed), search_tables(signed)[0].args(),
                        signed.zero_index, packed[1], v_absmax, step_values(unsigned),
                        search_tables(unsigned)[0].args(), unsigned.zero_index, hyper, block_size, neg_step,
                        per_byte=(2, 2))
    expected_p, (em_q, em_absmax), (ev_q, ev_absmax) = expected
    assert_bits_equal(p, expected_p, "param")
    assert_bits_equal(packed[0], reference.pack_indices(em_q, 4), "m indices")
    assert_bits_equal(packed[1], reference.pack_indices(ev_q, 4), "v indices")
    assert_bits_equal(m_absmax, em_absmax, "m absmax")
    assert_bits_equal(v_absmax, ev_absmax, "v absmax")


def test_wrong_sizes_are_refused_before_a_kernel_runs():
    code = dynamic_code(False, 4)
    x = np.ones(12, np.float32)
    with pytest.raises(ValueError, match="not a 3 x 5 matrix"):
        cpu.quantize_rank1(x, x.view(np.int32), search_tables(code)[0].args(), 0, 1, np.empty(12, np.uint8),
                           np.empty(3, np.float32), np.empty(5, np.float32))
    with pytest.raises(ValueError, match="q must be a contiguous 1-D uint8 array of 6"):
        cpu.quantize_rank1(x, x.view(np.int32), search_tables(code)[0].args(), 0, 2, np.empty(12, np.uint8),
                           np.empty(3, np.float32), np.empty(4, np.float32))
    with pytest.raises(ValueError, match="block of packed indices must fill whole bytes"):
        cpu.step_8bit(scalar.SGD, 1, x, x.copy(), np.zeros(6, np.float32), 3, np.empty(6, np.uint8),
                      np.empty(4, np.float32), step_values(code), search_tables(code)[0].args(), 0,
                      np.empty(0, np.uint8), np.empty(0, np.float32), step_values(code), search_tables(code)[0].args(),
                      0, per_byte=(2, 2))
    state = (np.empty(6, np.uint8), np.empty(3, np.float32), np.empty(5, np.float32), step_values(code),
             search_tables(code)[0].args(), 0, 2)
    with pytest.raises(ValueError, match="state 1 row maxima must be a contiguous 1-D float32 array of 2 elements"):
        cpu.step_rank1(scalar.ADAGRAD, 1, x, x.copy(), np.zeros(3, np.float32), 4, state, state)
