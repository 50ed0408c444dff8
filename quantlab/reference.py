"""The NumPy oracle: every algorithm quantlab computes, written for clarity, not speed.

Fast backends (``quantlab.kernels``) must agree with these functions bit for bit.

Rounding rule (docs/design.md section 2, with decision points rounded down; see ``quantlab.codes``):
u = x / absmax in IEEE float32; the index is the number of ``code.midpoints`` strictly below u,
i.e. the nearest code value, ties to the lower index. A block with absmax 0 stores absmax 0 and
the index of 0.0. Dequantization is ``code.values[q] * absmax`` in float32.

Input dtype policy: float32 is quantized as is; float16 and bfloat16 are widened to float32
(exactly); float64 is rounded to the nearest float32 first (a value beyond float32's range
becomes Inf and is rejected). Integer, boolean and complex inputs are rejected. Dequantization
always returns float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .codes import Code

ACCEPTED_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def as_float32(x, what: str = "x", check_finite: bool = True) -> np.ndarray:
    """``x`` as a float32 array following the dtype policy above; rejects non-finite values."""
    x = np.asarray(x)
    if x.dtype.name not in ACCEPTED_FLOAT_DTYPES:
        raise TypeError(f"{what} must be one of {', '.join(ACCEPTED_FLOAT_DTYPES)}, got {x.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32's range become Inf, rejected below
        x32 = x.astype(np.float32, copy=False)
    if check_finite and not np.all(np.isfinite(x32)):
        raise ValueError(f"{what} contains NaN or Inf (after conversion to float32)")
    return x32


def check_code(code) -> Code:
    if not isinstance(code, Code):
        raise TypeError(f"code must be a quantlab Code, got {type(code).__name__}")
    return code


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return int(block_size)


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def check_noise(noise, shape) -> np.ndarray:
    """Uniform noise for stochastic rounding: float32 in [0, 1), one value per element."""
    noise = np.asarray(noise)
    if noise.dtype != np.float32:
        raise TypeError(f"noise must be float32, got {noise.dtype}")
    if noise.shape != tuple(shape):
        raise ValueError(f"noise has shape {noise.shape}, the input has shape {tuple(shape)}")
    if not np.all((noise >= 0) & (noise < 1)):
        raise ValueError("noise must lie in [0, 1)")
    return noise


def check_indices(q, code: Code) -> np.ndarray:
    q = np.asarray(q)
    if q.dtype != np.uint8:
        raise TypeError(f"q must be uint8 code indices, got {q.dtype}")
    # Every uint8 is a valid index of a 256-value code; only shorter codes need the scan.
    if len(code) < 256 and q.size and int(q.max()) >= len(code):
        raise ValueError(f"q holds index {int(q.max())}, but code {code.name} has {len(code)} values")
    return q


def check_scales(scales, size: int, what: str) -> np.ndarray:
    """A 1-D float32 array of ``size`` finite, non-negative scales (block absmax, row or column max)."""
    scales = np.asarray(scales)
    if scales.dtype != np.float32 or scales.ndim != 1:
        raise TypeError(f"{what} must be a 1-D float32 array, got {scales.dtype} with shape {scales.shape}")
    if scales.size != size:
        raise ValueError(f"{what} has {scales.size} entries, {size} are needed")
    if not np.all(np.isfinite(scales) & (scales >= 0)):
        raise ValueError(f"{what} values must be finite and non-negative")
    return scales


def check_absmax(absmax, n: int, block_size: int) -> np.ndarray:
    absmax = np.asarray(absmax)
    if absmax.dtype != np.float32 or absmax.ndim != 1:
        raise TypeError(f"absmax must be a 1-D float32 array, got {absmax.dtype} with shape {absmax.shape}")
    expected = num_blocks(n, block_size)
    if absmax.size != expected:
        raise ValueError(f"absmax has {absmax.size} entries; {n} elements in blocks of {block_size} "
                         f"need {expected}")
    return check_scales(absmax, expected, "absmax")


def quantize(u, code: Code, noise=None) -> np.ndarray:
    """Code indices (uint8) of normalised values ``u`` (float32, usually in [-1, 1]).

    Nearest rounding by default. With ``noise`` (float32 uniform in [0, 1), same shape) the index is
    stochastic: the lower neighbour c[i] <= u is chosen, then moved up to c[i+1] when
    noise < (u - c[i]) / (c[i+1] - c[i]) (float32 arithmetic), so E[value] = u.
    """
    code = check_code(code)
    u = as_float32(u, "u")
    if noise is None:
        return np.searchsorted(code.midpoints, u, side="left").astype(np.uint8)
    noise = check_noise(noise, u.shape)
    c = code.values
    lower = np.clip(np.searchsorted(c, u, side="right") - 1, 0, len(c) - 1)
    upper = np.minimum(lower + 1, len(c) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = (u - c[lower]) / (c[upper] - c[lower])
    round_up = (upper > lower) & (noise < fraction)
    return (lower + round_up).astype(np.uint8)


def dequantize(q, code: Code) -> np.ndarray:
    """Code values (float32) of indices ``q``."""
    code = check_code(code)
    return code.values[check_indices(q, code)]


def quantize_blockwise(x, code: Code, block_size: int = 256, noise=None):
    """Block-wise quantization of the C-order flattened ``x``.

    Returns ``(q, absmax)``: uint8 indices shaped like ``x`` and the float32 absmax of each block of
    ``block_size`` consecutive elements (the last block may be shorter).
    """
    code = check_code(code)
    block_size = check_block_size(block_size)
    x = as_float32(x)
    if x.size == 0:
        raise ValueError("cannot quantize an empty array")
    if noise is not None:
        noise = check_noise(noise, x.shape).reshape(-1)
    flat = x.reshape(-1)
    n = flat.size
    nb = num_blocks(n, block_size)
    width = min(block_size, n)
    padded = np.zeros(nb * width, np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nb, width)
    absmax = np.max(np.abs(blocks), axis=1)
    u = np.divide(blocks, absmax[:, None], out=np.zeros_like(blocks), where=absmax[:, None] > 0)
    u = u.reshape(-1)[:n]
    q = quantize(u, code, noise)
    return q.reshape(x.shape), absmax


def dequantize_blockwise(q, absmax, code: Code, block_size: int = 256) -> np.ndarray:
    """Inverse of ``quantize_blockwise``: ``code.values[q] * absmax[block]`` in float32, shaped like ``q``."""
    code = check_code(code)
    block_size = check_block_size(block_size)
    q = check_indices(q, code)
    absmax = check_absmax(absmax, q.size, block_size)
    block_of_element = np.arange(q.size, dtype=np.int64) // block_size
    return (code.values[q.reshape(-1)] * absmax[block_of_element]).reshape(q.shape)


# --- states below 8 bits: packed indices, rank-1 normalisation ------------------------------------

PACKED_BITS = (2, 4)  # indices of codes this wide are stored 8 // bits a byte; wider ones one a byte


def indices_per_byte(bits: int) -> int:
    return 8 // bits if bits in PACKED_BITS else 1


def packed_size(n: int, bits: int) -> int:
    """Bytes that hold n indices of a ``bits``-bit code."""
    return -(-n // indices_per_byte(bits))


def pack_indices(q, bits: int) -> np.ndarray:
    """Indices of a code of ``bits`` bits, packed: index i of the flattened q sits in byte
    i // k at bit (i % k) * bits, low bits first, k = indices_per_byte(bits); the unused high bits of
    the last byte are 0. One a byte (a flat copy) for widths in no PACKED_BITS. Returns flat uint8."""
    q = np.asarray(q)
    if q.dtype != np.uint8:
        raise TypeError(f"q must be uint8 code indices, got {q.dtype}")
    if q.size and int(q.max()) >= 2**bits:
        raise ValueError(f"q holds index {int(q.max())}, which does not fit in {bits} bits")
    k = indices_per_byte(bits)
    padded = np.zeros(packed_size(q.size, bits) * k, np.uint8)
    padded[:q.size] = q.reshape(-1)
    shifts = (np.arange(k) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, k) << shifts, axis=1).astype(np.uint8)


def unpack_indices(packed, bits: int, n: int) -> np.ndarray:
    """The n indices (flat uint8) that ``pack_indices(q, bits)`` packed."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise TypeError(f"packed indices must be a 1-D uint8 array, got {packed.dtype} with shape {packed.shape}")
    if packed.size != packed_size(n, bits):
        raise ValueError(f"{n} indices of {bits} bits fill {packed_size(n, bits)} bytes, got {packed.size}")
    k = indices_per_byte(bits)
    shifts = (np.arange(k) * bits).astype(np.uint8)
    return ((packed[:, None] >> shifts) & np.uint8(2**bits - 1 if k > 1 else 255)).reshape(-1)[:n]


def rank1_shape(shape) -> tuple[int, int]:
    """The matrix (rows, columns) a tensor is normalised as under rank-1 normalisation: its first
    dimension by the product of the others. Tensors of fewer than 2 dimensions are refused."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or math.prod(shape) == 0:
        raise ValueError(f"rank-1 normalisation needs a non-empty tensor of 2 or more dimensions, got shape {shape}")
    return shape[0], math.prod(shape[1:])


def rank1_scale(row_max, col_max) -> np.ndarray:
    """Each element's scale: min(row max, column max), a (rows, columns) float32 array."""
    return np.minimum(row_max[:, None], col_max[None, :])


def quantize_rank1(x, code: Code):
    """Rank-1 normalisation (Li, Chen and Zhu 2023, section 4.2): x viewed as a (rows, columns)
    matrix (``rank1_shape``), element (i, j) divided by min(max_j |x_i.|, max_i |x_.j|) (so |u| <= 1),
    then the nearest code index as in ``quantize``; a zero scale stores code.zero_index.
    Returns (q shaped like x, row_max, col_max), float32 maxima of |x|."""
    code = check_code(code)
    x = as_float32(x)
    rows, cols = rank1_shape(x.shape)
    matrix = x.reshape(rows, cols)
    magnitude = np.abs(matrix)
    row_max, col_max = magnitude.max(axis=1), magnitude.max(axis=0)
    scale = rank1_scale(row_max, col_max)
    u = np.divide(matrix, scale, out=np.zeros_like(matrix), where=scale > 0)
    return quantize(u, code).reshape(x.shape), row_max, col_max


def dequantize_rank1(q, row_max, col_max, code: Code) -> np.ndarray:
    """``code.values[q] * min(row_max[i], col_max[j])`` in float32, shaped like q."""
    code = check_code(code)
    q = check_indices(q, code)
    rows, cols = rank1_shape(q.shape)
    row_max, col_max = check_scales(row_max, rows, "row_max"), check_scales(col_max, cols, "col_max")
    return (code.values[q.reshape(rows, cols)] * rank1_scale(row_max, col_max)).reshape(q.shape)


@dataclass(frozen=True)
class Blockwise:
    """The paper's format: (indices, absmax), one absmax per ``block_size`` consecutive elements;
    indices packed (``pack_indices``) when ``packed``, else shaped like the state."""

    code: Code
    block_size: int = 256
    packed: bool = False

    def quantize(self, x) -> tuple:
        q, absmax = quantize_blockwise(x, self.code, self.block_size)
        return (pack_indices(q, self.code.bits) if self.packed else q), absmax

    def dequantize(self, stored, shape) -> np.ndarray:
        q, absmax = stored
        q = unpack_indices(q, self.code.bits, math.prod(shape)) if self.packed else q
        return dequantize_blockwise(np.asarray(q).reshape(shape), absmax, self.code, self.block_size)


@dataclass(frozen=True)
class Rank1:
    """Rank-1 normalisation's format: (indices, row_max, col_max) (``quantize_rank1``); indices
    packed when ``packed``."""

    code: Code
    packed: bool = False

    def quantize(self, x) -> tuple:
        q, row_max, col_max = quantize_rank1(x, self.code)
        return (pack_indices(q, self.code.bits) if self.packed else q), row_max, col_max

    def dequantize(self, stored, shape) -> np.ndarray:
        q, row_max, col_max = stored
        q = unpack_indices(q, self.code.bits, math.prod(shape)) if self.packed else q
        return dequantize_rank1(np.asarray(q).reshape(shape), row_max, col_max, self.code)


# --- optimizer steps ------------------------------------------------------------------------------

def adam_hyperparameters(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                         decoupled: bool, step: int) -> np.ndarray:
    """The float32 constants of one Adam (L2 decay) or AdamW (decoupled decay) step.

    Computed in float64 and rounded once, as torch.optim does with its Python-float scalars.
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return np.array([
        0.0 if decoupled else weight_decay,       # L2 decay added to the gradient
        1 - lr * weight_decay if decoupled else 1.0,  # decoupled decay factor of the parameter
        1 - beta1, beta2, 1 - beta2,
        math.sqrt(bias_correction2), eps,
        -lr / bias_correction1,
    ], dtype=np.float32)


def adam_update(p, g, m, v, hyper):
    """Element-wise Adam/AdamW update in float32, in torch.optim.Adam's order of operations.

    torch's CPU kernels fuse some of these multiply-adds (lerp, addcmul); quantlab rounds every
    operation separately, so that NumPy, Numba and CUDA agree bit for bit (see the README).
    """
    p, g, m, v = (np.asarray(a, dtype=np.float32) for a in (p, g, m, v))
    g = g + hyper[0] * p
    p = p * hyper[1]
    m = m + hyper[2] * (g - m)
    v = v * hyper[3] + (hyper[4] * g) * g
    denom = np.sqrt(v) / hyper[5] + hyper[6]
    p = p + (hyper[7] * m) / denom
    return p, m, v


def sgd_hyperparameters(lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                        step: int) -> np.ndarray:
    """The float32 constants of one SGD step; at the first step torch copies the gradient into the
    momentum buffer, which buffer * 0 + 1 * gradient reproduces. Without momentum torch ignores
    dampening: the step is the gradient (buffer * 0 + 1 * gradient)."""
    first = step == 1
    return np.array([weight_decay, 0.0 if first else momentum, 1.0 if first or momentum == 0 else 1 - dampening,
                     1.0 if nesterov else 0.0, momentum, -lr], dtype=np.float32)


def sgd_update(p, g, buf, hyper):
    """SGD with momentum (torch.optim.SGD's order of operations; buf is the momentum buffer)."""
    p, g, buf = (np.asarray(a, dtype=np.float32) for a in (p, g, buf))
    g = g + hyper[0] * p
    buf = buf * hyper[1] + hyper[2] * g
    g = g + hyper[4] * buf if hyper[3] != 0 else buf
    return p + hyper[5] * g, buf


def lars_hyperparameters(lr: float, momentum: float, weight_decay: float, trust_ratio: float) -> np.ndarray:
    """LARS as sgd_update's constants: buffer = momentum * buffer + (lr * trust_ratio) * (g + wd * w),
    then w = w + (-1) * buffer."""
    return np.array([weight_decay, momentum, lr * trust_ratio, 0.0, momentum, -1.0], dtype=np.float32)


def lion_hyperparameters(lr: float, beta1: float, beta2: float, weight_decay: float) -> np.ndarray:
    return np.array([1 - lr * weight_decay, 1 - beta1, 1 - beta2, -lr], dtype=np.float32)


def lion_update(p, g, m, hyper):
    """Lion (Chen et al. 2023, Algorithm 2): decoupled decay, the sign of an interpolation of m and g
    as the step, then m moves towards g."""
    p, g, m = (np.asarray(a, dtype=np.float32) for a in (p, g, m))
    p = p * hyper[0]
    c = m + hyper[1] * (g - m)
    p = p + hyper[3] * np.sign(c).astype(np.float32)
    m = m + hyper[2] * (g - m)
    return p, m


def rmsprop_hyperparameters(lr: float, alpha: float, eps: float, weight_decay: float, momentum: float,
                            centered: bool) -> np.ndarray:
    """Mode 0: plain; 1: centred (second state: gradient average); 2: momentum (second state: buffer)."""
    if centered and momentum:
        raise ValueError("centred RMSprop with momentum needs three states, which quantlab does not support yet")
    mode = 1 if centered else 2 if momentum else 0
    return np.array([weight_decay, alpha, 1 - alpha, eps, mode, momentum, -lr], dtype=np.float32)


def rmsprop_update(p, g, square_avg, *other_and_hyper):
    """RMSprop (torch.optim.RMSprop's order of operations): (p, g, square_avg, [other,] hyper),
    ``other`` being the centred gradient average or the momentum buffer (modes 1 and 2). The
    centred variance is clamped at 0: with quantized averages it can come out slightly negative,
    where torch would take the square root of a negative number."""
    *others, hyper = other_and_hyper
    other = others[0] if others else np.zeros_like(square_avg)
    p, g, square_avg, other = (np.asarray(a, dtype=np.float32) for a in (p, g, square_avg, other))
    g = g + hyper[0] * p
    square_avg = square_avg * hyper[1] + (hyper[2] * g) * g
    if hyper[4] == 1:
        other = other + hyper[2] * (g - other)
        avg = np.sqrt(np.maximum(square_avg - other * other, np.float32(0))) + hyper[3]
    else:
        avg = np.sqrt(square_avg) + hyper[3]
    if hyper[4] == 2:
        other = other * hyper[5] + g / avg
        p = p + hyper[6] * other
    else:
        p = p + (hyper[6] * g) / avg
    return (p, square_avg, other) if others else (p, square_avg)


def adagrad_hyperparameters(lr: float, lr_decay: float, eps: float, weight_decay: float, step: int) -> np.ndarray:
    return np.array([weight_decay, eps, -lr / (1 + (step - 1) * lr_decay)], dtype=np.float32)


def adagrad_update(p, g, state_sum, hyper):
    """Adagrad (torch.optim.Adagrad's order of operations)."""
    p, g, state_sum = (np.asarray(a, dtype=np.float32) for a in (p, g, state_sum))
    g = g + hyper[0] * p
    state_sum = state_sum + g * g
    return p + (hyper[2] * g) / (np.sqrt(state_sum) + hyper[1]), state_sum


def lamb_hyperparameters(beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> np.ndarray:
    return np.array([1 - beta1, beta2, 1 - beta2, 1 - beta1**step, 1 - beta2**step, eps, weight_decay],
                    dtype=np.float32)


def lamb_direction(p, m, v, hyper):
    """LAMB's r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p (float32)."""
    return (m / hyper[3]) / (np.sqrt(v / hyper[4]) + hyper[5]) + hyper[6] * p


def blockwise_norm(x, block_size: int) -> float:
    """L2 norm: float64 squares summed in element order within blocks, math.fsum over blocks."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    padded = np.zeros(num_blocks(x.size, block_size) * block_size)
    padded[: x.size] = x * x
    return math.sqrt(math.fsum(np.cumsum(padded.reshape(-1, block_size), axis=1)[:, -1]))


def lamb_step(param, grad, m, v, hyper, lr: float, block_size: int, codes=None):
    """One LAMB step (You et al. 2019, Algorithm 2): Adam's moments, r = m_hat / (sqrt(v_hat) + eps)
    + wd * p, p -= lr * (||p|| / ||r||) * r (trust ratio 1 when a norm is 0).

    m, v: float32 arrays, or (q, absmax) pairs with ``codes`` = (signed, unsigned) for 8-bit state,
    requantized after the step; r comes from the float32 moments, as in Adam. Norms: float64
    squares summed in element order within blocks of ``block_size``, math.fsum over the blocks (as
    the kernels do, so the trust ratio agrees to the last bit). Returns (param, m, v) as given."""
    p, g = (np.asarray(a, dtype=np.float32) for a in (param, grad))
    if codes is not None:
        m = dequantize_blockwise(*m, codes[0], block_size)
        v = dequantize_blockwise(*v, codes[1], block_size)
    m = m + hyper[0] * (g - m)
    v = v * hyper[1] + (hyper[2] * g) * g
    r = lamb_direction(p, m, v, hyper)
    r_norm, p_norm = blockwise_norm(r, block_size), blockwise_norm(p, block_size)
    trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
    p = p + np.float32(-lr * trust) * r
    if codes is not None:
        m, v = quantize_blockwise(m, codes[0], block_size), quantize_blockwise(v, codes[1], block_size)
    return p, m, v


def step_quantized(update, param, grad, stored_states, formats, hyper):
    """One optimizer step with quantized states: dequantize each stored state with its format
    (``Blockwise`` or ``Rank1``), apply ``update(param, grad, *states, hyper)`` in float32,
    requantize in the same formats. Returns (param, [stored state, ...])."""
    param = np.asarray(param, dtype=np.float32)
    states = [f.dequantize(s, param.shape) for s, f in zip(stored_states, formats)]
    param, *states = update(param, grad, *states, hyper)
    return param, [f.quantize(x) for x, f in zip(states, formats)]


def step_8bit(update, param, grad, quantized_states, codes, block_size: int, hyper):
    """``step_quantized`` with the paper's block-wise states, one index a byte: quantized_states
    are (q, absmax) pairs. Returns (param, [(q, absmax), ...])."""
    return step_quantized(update, param, grad, quantized_states, [Blockwise(c, block_size) for c in codes], hyper)
