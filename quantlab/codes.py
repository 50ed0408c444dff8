"""Quantization codes (codebooks): sorted float32 values in [-1, 1] that an index selects.

A block-wise quantizer stores, per element, the index of the code value nearest to
x / absmax(block). Everything a backend needs to find that index is derived here once,
from the values alone:

* ``midpoints``: the decision points of nearest rounding. The exact midpoint of two
  neighbouring float32 values is rounded *down* to float32, so that for every float32 u,
  ``count(midpoints < u)`` is the index of the nearest value with ties going to the lower
  index -- exactly what an argmin in exact arithmetic gives. (Rounding the midpoint to
  nearest instead would send a u equal to a midpoint that rounded up to the wrong side.)
* ``floor_points``: ``count(floor_points < u)`` is the index of the largest value <= u,
  the lower neighbour that stochastic rounding starts from.

Zero-free codes (Li, Chen and Zhu 2023, "Memory Efficient Optimizers with 4-bit States"): a code
for non-negative states (Adam's v) may leave 0.0 out, so that no positive value is ever stored as 0
(1 / sqrt(v) of a v stored as 0 is eps's inverse: the zero-point problem). Its smallest value
stands in for zero: an all-zero block stores absmax 0, which still dequantizes to 0.

Constructors: ``dynamic_code``, ``linear_code``, ``quantile_code``, ``fp8_code`` and the minifloats
``float_code``; ``make_code`` picks one of the ``FAMILIES`` for a given bit width and data.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import numpy as np

MIN_BITS, MAX_BITS = 2, 8


def _round_down_to_float32(x64: np.ndarray) -> np.ndarray:
    """Largest float32 <= each float64 value."""
    x32 = x64.astype(np.float32)
    too_high = x32.astype(np.float64) > x64
    x32[too_high] = np.nextafter(x32[too_high], np.float32(-np.inf))
    return x32


class Code:
    """An immutable quantization map: ``values`` (sorted, unique, float32, in [-1, 1]), holding 0.0
    or all positive (a zero-free code). ``zero_index`` is the index of 0.0, or of the smallest value
    of a zero-free code: what an all-zero block stores (with absmax 0)."""

    __slots__ = ("values", "name", "bits", "midpoints", "floor_points", "zero_index", "_key")

    def __init__(self, values, name: str = "custom", bits: int | None = None):
        if np.ndim(values) != 1:
            raise ValueError(f"code values must be one-dimensional, got shape {np.shape(values)}")
        v = np.array(values, dtype=np.float32)
        if v.size < 2:
            raise ValueError(f"a code needs at least 2 values, got {v.size}")
        if not np.all(np.isfinite(v)):
            raise ValueError("code values must be finite")
        if np.any(np.abs(v) > 1):
            raise ValueError(f"code values must lie in [-1, 1], found {v[np.abs(v) > 1][:3].tolist()}")
        if np.any(np.diff(v) <= 0):
            if np.any(np.diff(v) < 0):
                raise ValueError("code values must be sorted in increasing order")
            raise ValueError("code values must be unique (after rounding to float32)")
        if not np.any(v == 0) and v[0] < 0:
            raise ValueError("code values must contain 0.0 so that zeros and all-zero blocks are exact "
                             "(only a code of positive values may leave it out: a zero-free code)")
        if bits is None:
            bits = max(MIN_BITS, int(np.ceil(np.log2(v.size))))
        bits = _check_bits(bits)
        if v.size > 2**bits:
            raise ValueError(f"{v.size} values do not fit in {bits} bits")
        v[v == 0] = 0.0  # store +0.0, never -0.0
        v.setflags(write=False)
        mid = _round_down_to_float32((v[:-1].astype(np.float64) + v[1:].astype(np.float64)) / 2)
        floor = np.nextafter(v[1:], np.float32(-np.inf))
        for a in (mid, floor):
            a.setflags(write=False)
        for slot, value in [("values", v), ("name", str(name)), ("bits", int(bits)), ("midpoints", mid),
                            ("floor_points", floor), ("zero_index", int(np.argmin(np.abs(v)))),
                            ("_key", (v.tobytes(), int(bits)))]:
            object.__setattr__(self, slot, value)

    def __setattr__(self, name, value):
        raise AttributeError("Code is immutable")

    def __delattr__(self, name):
        raise AttributeError("Code is immutable")

    @property
    def signed(self) -> bool:
        return bool(self.values[0] < 0)

    @property
    def zero_free(self) -> bool:
        """No value is 0: every stored element dequantizes to a non-zero value unless its absmax is 0."""
        return bool(self.values[0] > 0)

    def __len__(self) -> int:
        return self.values.size

    def __eq__(self, other) -> bool:
        return isinstance(other, Code) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Code({self.name!r}, bits={self.bits}, n={len(self)}, signed={self.signed})"

    def __reduce__(self):
        # plain floats (float32 -> Python float is exact), so that torch's weights-only unpickler,
        # which refuses NumPy arrays, can rebuild a Code saved in an optimizer's state dict
        return (Code, (tuple(self.values.tolist()), self.name, self.bits))


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return int(bits)


def _fma_float32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    # a*b is exact in float64; the sum is exact for the operands used here, so one rounding.
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def _linspace_like_torch(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace`` on the CPU, which bitsandbytes builds its map with.

    torch computes step = (end - start) / (steps - 1) in float32 and each value as
    start + step * i below the halfway index and end - step * (steps - 1 - i) above it;
    the compiler contracts these to fused multiply-adds (one rounding), reproduced here.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    half = steps // 2
    return np.array([_fma_float32(step, np.float32(i), start32) if i < half
                     else _fma_float32(-step, np.float32(steps - 1 - i), end32) for i in range(steps)],
                    dtype=np.float32)


def dynamic_code(signed: bool = True, bits: int = 8, symmetric: bool = False, include_zero: bool = True) -> Code:
    """Dynamic tree map of Dettmers (2016), in bitsandbytes' ``create_dynamic_map`` layout.

    For exponent level i = 0 .. bits-2 the decade is 10**(i - (bits - 2)); in it lie the midpoints
    of the k intervals of linspace(0.1, 1, k + 1), k = 2**i (signed, with their negatives) or
    2**(i+1) (unsigned); plus 0 and 1.0. With bits=8 this is bit-identical to bitsandbytes'
    map: -1.0 is not in the signed map, so a block whose largest magnitude is negative is not
    stored exactly. ``symmetric=True`` mirrors the positive half (1.0 included) onto the negatives
    and drops the smallest-magnitude pair to fit: 2**bits - 1 values, -1.0 and 1.0 both exact.
    ``include_zero=False`` (unsigned only) leaves 0 out: Li et al.'s zero-free "DE-0" map,
    2**bits - 1 values whose smallest, 0.325 * 10**-(bits - 2), stands in for zero.
    """
    bits = _check_bits(bits)
    if symmetric and not signed:
        raise ValueError("symmetric=True needs signed=True")
    if not include_zero and signed:
        raise ValueError("include_zero=False is for unsigned codes (signed states need 0: m is 0 where g is)")
    levels = bits - 1
    positive = []
    for i in range(levels):
        k = 2**i if signed or symmetric else 2 ** (i + 1)
        bounds = _linspace_like_torch(0.1, 1.0, k + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        positive.append(np.float32(10.0 ** (i - (levels - 1))) * means)
    positive = np.concatenate(positive + [np.array([1.0], np.float32)])
    if symmetric:
        positive = np.sort(positive)[1:]
        values = np.concatenate([-positive, [0.0], positive])
        name = f"dynamic{bits}-symmetric"
    elif signed:
        values = np.concatenate([-positive[:-1], [0.0], positive])
        name = f"dynamic{bits}-signed"
    else:
        values = np.concatenate([[0.0], positive]) if include_zero else positive
        name = f"dynamic{bits}-unsigned" + ("" if include_zero else "-zero-free")
    return Code(np.sort(values.astype(np.float32)), name, bits)


def linear_code(bits: int = 8, signed: bool = True, include_zero: bool = True) -> Code:
    """Evenly spaced values: 2**bits - 1 in [-1, 1] (odd, so 0 is one of them) or 2**bits in [0, 1].

    ``include_zero=False`` (unsigned only): Li et al.'s zero-free linear map (i + 1) / 2**bits,
    i = 0 .. 2**bits - 1, the paper's 4-bit code for the second moment.
    """
    bits = _check_bits(bits)
    if not include_zero:
        if signed:
            raise ValueError("include_zero=False is for unsigned codes (signed states need 0: m is 0 where g is)")
        values = np.arange(1, 2**bits + 1) / 2**bits
        return Code(values.astype(np.float32), f"linear{bits}-unsigned-zero-free", bits)
    values = np.linspace(-1.0, 1.0, 2**bits - 1) if signed else np.linspace(0.0, 1.0, 2**bits)
    return Code(values.astype(np.float32), f"linear{bits}-{'signed' if signed else 'unsigned'}", bits)


def quantile_code(sample, bits: int = 8, offset: float | None = None) -> Code:
    """Quantiles of ``sample`` at 2**bits evenly spaced probabilities in [offset, 1 - offset].

    The quantiles are scaled by their largest magnitude into [-1, 1]; repeated quantiles are merged
    and the one nearest zero is replaced by 0.0 (zeros must stay exact). ``offset`` defaults to half
    a probability step, 1 / 2**(bits+1), so the tails are represented without the extremes.
    """
    bits = _check_bits(bits)
    x = np.asarray(sample, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("quantile_code needs a non-empty sample")
    if not np.all(np.isfinite(x)):
        raise ValueError("quantile_code sample contains NaN or Inf")
    offset = 1.0 / 2 ** (bits + 1) if offset is None else float(offset)
    if not 0.0 <= offset < 0.5:
        raise ValueError(f"offset must be in [0, 0.5), got {offset}")
    q = np.quantile(x, np.linspace(offset, 1.0 - offset, 2**bits))
    scale = np.max(np.abs(q))
    if scale == 0:
        raise ValueError("quantile_code sample quantiles are all zero")
    values = np.unique((q / scale).astype(np.float32))
    values[np.argmin(np.abs(values))] = 0.0
    values = np.unique(values)
    if values.size < 2:
        raise ValueError("quantile_code sample has fewer than 2 distinct quantiles")
    return Code(values, f"quantile{bits}", bits)


_FP8_FORMATS = {"e4m3": (4, 3, 7), "e5m2": (5, 2, 15)}  # exponent bits, mantissa bits, bias


def _decode_fp8(fmt: str) -> np.ndarray:
    """All finite values of an fp8 format (OCP e4m3fn: no Inf, one NaN pattern; e5m2: IEEE-like)."""
    e_bits, m_bits, bias = _FP8_FORMATS[fmt]
    pattern = np.arange(256)
    sign = np.where(pattern >> 7, -1.0, 1.0)
    exponent = (pattern >> m_bits) & (2**e_bits - 1)
    mantissa = pattern & (2**m_bits - 1)
    normal = (1 + mantissa / 2**m_bits) * 2.0 ** (exponent - bias)
    subnormal = (mantissa / 2**m_bits) * 2.0 ** (1 - bias)
    value = sign * np.where(exponent == 0, subnormal, normal)
    top = exponent == 2**e_bits - 1
    special = top & (mantissa == 2**m_bits - 1) if fmt == "e4m3" else top
    return value[~special]


def fp8_code(fmt: str = "e4m3") -> Code:
    """The finite values of an fp8 format divided by its largest value (448 for e4m3, 57344 for e5m2)."""
    if fmt not in _FP8_FORMATS:
        raise ValueError(f"fp8 format must be one of {sorted(_FP8_FORMATS)}, got {fmt!r}")
    finite = np.unique(_decode_fp8(fmt))
    return Code((finite / finite.max()).astype(np.float32), f"fp8-{fmt}", 8)


def float_code(bits: int = 8, exponent_bits: int | None = None, signed: bool = True) -> Code:
    """A minifloat code: every value of a (sign,) exponent, mantissa format with IEEE-style
    subnormals and bias 2**(e-1) - 1, all bit patterns finite (as OCP FP4 E2M1 and FP6 E3M2), divided
    by the largest. The default exponent width is half the magnitude bits, rounded up: E1M1, E2M1
    (FP4), E2M2, E3M2 (FP6), E3M3, E4M3 for signed 3..8 bits. Signed 8-bit E4M3 is ``fp8_code("e4m3")``
    itself (OCP e4m3fn, which reserves the top pattern for NaN)."""
    bits = _check_bits(bits)
    magnitude_bits = bits - (1 if signed else 0)
    e = math.ceil(magnitude_bits / 2) if exponent_bits is None else int(exponent_bits)
    if signed and bits == 8 and e == 4:
        return fp8_code("e4m3")
    m = magnitude_bits - e
    if e < 1 or m < 0:
        raise ValueError(f"{bits} bits ({'signed' if signed else 'unsigned'}) cannot hold {e} exponent bits")
    bias = 2 ** (e - 1) - 1
    exponent, mantissa = np.meshgrid(np.arange(2**e), np.arange(2**m), indexing="ij")
    fraction = mantissa / 2**m
    magnitudes = np.where(exponent == 0, fraction * 2.0 ** (1 - bias), (1 + fraction) * 2.0 ** (exponent - bias))
    magnitudes = np.unique(magnitudes) / magnitudes.max()
    values = np.unique(np.concatenate([-magnitudes, magnitudes])) if signed else magnitudes
    return Code(values.astype(np.float32), f"float{bits}-e{e}m{m}{'' if signed else '-unsigned'}", bits)


FAMILIES = ("dynamic", "dynamic-symmetric", "linear", "quantile", "float")
ZERO_FREE_FAMILIES = ("dynamic-zero-free", "linear-zero-free")  # unsigned only: for non-negative data


def make_code(family: str, bits: int = 8, sample=None, signed: bool | None = None) -> Code | None:
    """The ``family`` code (one of ``FAMILIES``) at ``bits`` bits, for data like ``sample``.

    ``signed`` defaults to whether ``sample`` holds a negative value (True without a sample): non-
    negative data such as Adam's v get the unsigned variant. ``"quantile"`` is fitted to ``sample``.
    Returns None where the family has no such variant (``"dynamic-symmetric"`` unsigned, the
    ``ZERO_FREE_FAMILIES`` signed).
    """
    if signed is None:
        signed = sample is None or bool(np.any(np.asarray(sample) < 0))
    if family == "dynamic":
        return dynamic_code(signed, bits)
    if family == "dynamic-symmetric":
        return dynamic_code(True, bits, symmetric=True) if signed else None
    if family in ZERO_FREE_FAMILIES:
        if signed:
            return None
        return (dynamic_code if family == "dynamic-zero-free" else linear_code)(signed=False, bits=bits,
                                                                                include_zero=False)
    if family == "linear":
        return linear_code(bits, signed)
    if family == "quantile":
        if sample is None:
            raise ValueError("the quantile code needs a sample to fit")
        return quantile_code(sample, bits)
    if family == "float":
        return float_code(bits, signed=signed)
    raise ValueError(f"unknown code family {family!r}; choose one of {FAMILIES + ZERO_FREE_FAMILIES}")


def family_codes(bits: int = 8, families: Iterable[str] = FAMILIES) -> dict[str, Callable]:
    """``{family: sample -> make_code(family, bits, sample)}``: each family's code chosen for the data
    it will quantize (signedness, quantile fit), as ``quantlab.analysis.error_table`` takes codes."""
    return {family: functools.partial(make_code, family, bits) for family in families}
