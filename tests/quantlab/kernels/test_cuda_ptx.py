"""The CUDA kernels compiled to PTX for a real GPU, which needs libNVVM but no GPU: they compile (the
simulator runs them as Python and cannot tell; Numba 0.66-0.68 cannot compile min()/max() for CUDA),
and no float32 multiply is fused with an addition, which would round differently from the CPU and
the reference."""
from __future__ import annotations

import re
from types import SimpleNamespace

import numba
import pytest
from numba import types

pytestmark = pytest.mark.skipif(numba.config.ENABLE_CUDASIM, reason="compiles for a real GPU")

f32, u8, i32 = (types.Array(t, 1, "C") for t in (types.float32, types.uint8, types.int32))
i64, partial = types.int64, types.Array(types.float64, 2, "C")
hyper = types.UniTuple(types.float32, 8)
# q, scale a (absmax or row maxima), scale b (column maxima), new maxima bits, values, table, points, shift, bias,
# zero index, indices a byte
state = (u8, f32, f32, i32, f32, u8, f32, i64, i64, i64, i64)
KERNELS = {
    "quantize_blockwise": (f32, i32, i64, u8, f32, i64, i64, i64, u8, f32),
    "quantize_blockwise_stochastic": (f32, i32, f32, i64, u8, f32, i64, i64, f32, i64, u8, f32),
    "dequantize_blockwise": (u8, f32, f32, i64, f32),
    "_step_32bit": (i64, i64, f32, f32, f32, f32, hyper),
    "_step_quantized": (types.boolean, i64, i64, f32, f32, hyper, i64, *state, *state),
    "_lamb_norms": (types.boolean, f32, f32, f32, f32, u8, f32, f32, i64, u8, f32, f32, i64, hyper, i64, partial),
    "_pack": (u8, i64, u8), "_unpack": (u8, i64, u8), "_zero": (i32,),
    "_rank1_maxima": (i32, i64, i64, i32),
    "_quantize_rank1": (f32, i32, i64, i64, u8, f32, i64, i64, i64, i64, u8),
    "_dequantize_rank1": (u8, f32, f32, f32, i64, f32),
    "_store_maxima": (i32, f32, f32),
}


@pytest.mark.parametrize("name", KERNELS)
def test_compiles_without_fused_float32_multiply_add(name, monkeypatch):
    from numba import cuda
    from numba.cuda.cudadrv.error import NvvmSupportError

    from quantlab.kernels import cuda as kernels

    assert kernels.HYPER_SLOTS == 8
    # Device functions compile for the current device's compute capability; without a GPU, name one.
    monkeypatch.setattr("numba.cuda.dispatcher.get_current_device", lambda: SimpleNamespace(compute_capability=(9, 0)))
    try:
        ptx, _ = cuda.compile_ptx(getattr(kernels, name).py_func, KERNELS[name], cc=(9, 0))
    except NvvmSupportError as error:
        pytest.skip(f"libNVVM not available: {error}")
    ops = set(re.findall(r"^\s*((?:fma|mad|mul|add|sub|div|sqrt|rcp)\.[\w.]*f32)\b", ptx, re.M))
    assert not {op for op in ops if op.startswith(("fma", "mad"))}, ops
    assert "mul.f32" not in ops, ops  # ptxas may fuse a multiply without a rounding mode with an add
    assert not {op for op in ops if "approx" in op or "ftz" in op}, ops  # IEEE division and square root
