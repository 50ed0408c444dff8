"""quantlab.kernels.simd: the sixteen-lane quantizer and the int32 maximum against the scalar maths and
the reference, through the CPU kernels that use them, at lengths with and without a tail of fewer than 16."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.kernels import SIGNED_CODES, UNSIGNED_CODES
from quantlab import kernels, reference
from quantlab.kernels import cpu
from quantlab.kernels.lookup import search_tables
from quantlab.kernels.simd import LANES, largest_magnitude

lengths = st.one_of(st.sampled_from([0, 1, LANES - 1, LANES, LANES + 1, 4 * LANES, 4 * LANES + 3, 1000]),
                    st.integers(0, 3000))


def _values_in_unit_range(rng, n):
    """float32 in [-1, 1] over many decades, with zeros, signed zeros and the ends."""
    u = (rng.uniform(-1, 1, n) * 10.0 ** -rng.integers(0, 40, n)).astype(np.float32)
    specials = np.float32([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45])
    u[rng.random(n) < 0.05] = 0.0
    if n:
        u[rng.integers(0, n, 3)] = specials[rng.integers(0, specials.size, 3)]
    return np.clip(u, -1, 1).astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(n=lengths, seed=st.integers(0, 2**32 - 1), code=st.sampled_from(SIGNED_CODES + UNSIGNED_CODES),
       floor=st.booleans())
def test_vector_search_equals_scalar_search(n, seed, code, floor):
    """quantize16 (scale 1) over whole groups of 16, the scalar search on the tail: both equal to the
    table's NumPy index and to a binary search over the decision points."""
    u = _values_in_unit_range(np.random.default_rng(seed), n)
    table = search_tables(code)[1 if floor else 0]
    out = np.empty(n, np.uint8)
    cpu.search_all(u, *table.args(), out)
    np.testing.assert_array_equal(out, table.index(u))
    points = code.floor_points if floor else code.midpoints
    np.testing.assert_array_equal(out, np.searchsorted(points, u, side="left"))


@settings(max_examples=150, deadline=None)
@given(n=lengths, seed=st.integers(0, 2**32 - 1), code=st.sampled_from(SIGNED_CODES + UNSIGNED_CODES),
       block_size=st.sampled_from([1, 7, 16, 33, 256, 4096]))
def test_vector_quantize_equals_reference(n, seed, code, block_size):
    """quantize16 divides by the block absmax in its lanes: the indices and absmax equal the
    reference's (scalar division, float64 brute-force search) for blocks with and without a tail."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(max(n, 1)) * 10.0 ** rng.integers(-30, 30)).astype(np.float32)
    q, absmax = kernels.quantize_blockwise(x, code, block_size, backend="cpu")
    expected_q, expected_absmax = reference.quantize_blockwise(x, code, block_size)
    np.testing.assert_array_equal(q, expected_q)
    np.testing.assert_array_equal(absmax.view(np.uint32), expected_absmax.view(np.uint32))


@numba.njit
def _largest(bits):
    return largest_magnitude(bits)


@settings(max_examples=200, deadline=None)
@given(n=lengths, seed=st.integers(0, 2**32 - 1))
def test_largest_magnitude_equals_numpy(n, seed):
    bits = np.random.default_rng(seed).integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    expected = int(np.max(bits & 0x7FFFFFFF)) if n else 0
    assert int(_largest(bits)) == expected


@pytest.mark.slow
def test_same_results_on_a_cpu_without_gathers(tmp_path):
    """The intrinsics compiled for plain x86-64 (SSE2: LLVM scalarises every gather) give the same
    results: this file's other tests and the step kernels' in a process of their own (~1 min)."""
    env = {**os.environ, "NUMBA_CPU_NAME": "x86-64", "NUMBA_CPU_FEATURES": "+sse2",
           "NUMBA_CACHE_DIR": str(tmp_path)}
    here = Path(__file__).parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                           str(here / "test_simd.py"), str(here / "test_step_kernels.py")],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
