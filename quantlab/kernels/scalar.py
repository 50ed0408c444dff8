"""Per-element maths shared by the CPU and CUDA kernels, written once as plain Python.

``compile_scalar_maths`` compiles these functions for one target: ``jit`` is ``numba.njit`` or
``numba.cuda.jit(device=True)``, ``float_of_bits`` is that target's int32 -> float32 bit cast and
``mul`` its float32 product. Indices are unsigned 64-bit: no negative-index handling in the hot
loop, no overflow past 2**31.

No min() or max(): Numba 0.66 to 0.68 cannot compile them for CUDA (numba issue #10753).

Every float32 product goes through ``mul``, so that each is rounded on its own, as in the reference.
NVVM contracts ``a * b + c`` into a fused multiply-add by default (even without fastmath), which
rounds once instead of twice; on a GPU ``mul`` is libdevice's ``fmul_rn`` (CUDA C's __fmul_rn),
which is never contracted. On the CPU it is a plain product: LLVM does not contract without
fastmath. The float64 squares of the LAMB norms are exact (24-bit significands), so contracting
their sum cannot change it.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

MAGNITUDE_BITS = 0x7FFFFFFF
INF_BITS = 0x7F800000  # |x| bits at or above this are Inf or NaN

# Optimizer kinds of the fused step kernels (quantlab.optim); each update maps
# (param, grad, state1, state2, hyper) -> (param, state1, state2) in float32.
ADAM, SGD, LION, RMSPROP, ADAGRAD = 0, 1, 2, 3, 4


def compile_scalar_maths(jit, float_of_bits, mul) -> SimpleNamespace:
    @jit
    def block_bounds(block, block_size, n):
        start = np.int64(block) * np.int64(block_size)
        end = start + np.int64(block_size)
        return start, end if end < n else np.int64(n)

    @jit
    def search(u, u_bits, table, points, shift, bias):
        """count(points < u) for -1 <= u <= 1 with bit pattern u_bits (see lookup.py)."""
        s = np.int64(u_bits)
        key = s ^ ((s >> 31) & MAGNITUDE_BITS)
        i = np.uint64(table[np.uint64(key + bias) >> np.uint64(shift)])
        return i + np.uint64(points[i] < u)  # the bucket holds at most one point: points[i]

    @jit
    def stochastic_round_up(u, noise, lower, values):
        """1 if u moves from values[lower] up to values[lower + 1], else 0 (float32 arithmetic)."""
        if lower + 1 >= values.size:
            return 0
        low = values[lower]
        fraction = (u - low) / (values[lower + 1] - low)
        return 1 if noise < fraction else 0

    @jit
    def absmax_of_bits(largest_magnitude_bits):
        return float_of_bits(np.int32(largest_magnitude_bits))

    @jit
    def dequantize(values, index, absmax):
        return mul(values[index], absmax)

    @jit
    def adam_update(p, g, m, v, hyper):
        """One Adam/AdamW element update in float32, in torch.optim.Adam's order of operations.

        hyper (float32, see reference.adam_hyperparameters): L2 decay, decoupled decay factor,
        1 - beta1, beta2, 1 - beta2, sqrt(bias correction 2), eps, -lr / bias correction 1.
        """
        g = g + mul(hyper[0], p)
        p = mul(p, hyper[1])
        m = m + mul(hyper[2], g - m)
        v = mul(v, hyper[3]) + mul(mul(hyper[4], g), g)
        denom = math.sqrt(v) / hyper[5] + hyper[6]
        p = p + mul(hyper[7], m) / denom
        return p, m, v

    @jit
    def sgd_update(p, g, buf, hyper):
        """SGD with momentum, dampening and Nesterov, in torch.optim.SGD's order of operations.

        hyper: see reference.sgd_hyperparameters.
        """
        g = g + mul(hyper[0], p)
        buf = mul(buf, hyper[1]) + mul(hyper[2], g)
        if hyper[3] != 0:
            g = g + mul(hyper[4], buf)
        else:
            g = buf
        return p + mul(hyper[5], g), buf

    @jit
    def lion_update(p, g, m, hyper):
        """Lion (Chen et al. 2023): p -= lr * sign(lerp(m, g, 1 - beta1)); m = lerp(m, g, 1 - beta2).

        hyper: see reference.lion_hyperparameters.
        """
        p = mul(p, hyper[0])
        c = m + mul(hyper[1], g - m)
        direction = int(c > 0) - int(c < 0)  # int(): NumPy (the CUDA simulator) cannot subtract bools
        p = p + mul(hyper[3], np.float32(direction))
        m = m + mul(hyper[2], g - m)
        return p, m

    @jit
    def rmsprop_update(p, g, square_avg, other, hyper):
        """RMSprop in torch.optim.RMSprop's order; ``other`` is the centred gradient average
        (mode 1) or the momentum buffer (mode 2). hyper: see reference.rmsprop_hyperparameters."""
        g = g + mul(hyper[0], p)
        square_avg = mul(square_avg, hyper[1]) + mul(mul(hyper[2], g), g)
        if hyper[4] == 1:
            other = other + mul(hyper[2], g - other)
            # clamped at 0 (NaN passes): quantized averages can make the centred variance slightly negative
            variance = square_avg - mul(other, other)
            avg = math.sqrt(np.float32(0) if variance < 0 else variance) + hyper[3]
        else:
            avg = math.sqrt(square_avg) + hyper[3]
        if hyper[4] == 2:
            other = mul(other, hyper[5]) + g / avg
            p = p + mul(hyper[6], other)
        else:
            p = p + mul(hyper[6], g) / avg
        return p, square_avg, other

    @jit
    def adagrad_update(p, g, state_sum, hyper):
        """Adagrad in torch.optim.Adagrad's order. hyper: weight decay, eps, -lr / (1 + (step-1) lr_decay)."""
        g = g + mul(hyper[0], p)
        state_sum = state_sum + mul(g, g)
        return p + mul(hyper[2], g) / (math.sqrt(state_sum) + hyper[1]), state_sum

    @jit
    def lamb_moments(g, m, v, hyper):
        """LAMB's (You et al. 2019, Algorithm 2) moments, as Adam's without weight decay.
        hyper: see reference.lamb_hyperparameters."""
        m = m + mul(hyper[0], g - m)
        v = mul(v, hyper[1]) + mul(mul(hyper[2], g), g)
        return m, v

    @jit
    def lamb_direction(p, m, v, hyper):
        """r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p, in float32."""
        return (m / hyper[3]) / (math.sqrt(v / hyper[4]) + hyper[5]) + mul(hyper[6], p)

    @jit
    def lamb_apply(p, g, m, v, hyper, neg_step):
        """LAMB's pass 2 on one element: this step's moments, then p + neg_step * r."""
        m, v = lamb_moments(g, m, v, hyper)
        return p + mul(neg_step, lamb_direction(p, m, v, hyper)), m, v

    @jit
    def update(kind, p, g, s1, s2, hyper):
        """The update of optimizer ``kind``; unused states pass through."""
        if kind == ADAM:
            return adam_update(p, g, s1, s2, hyper)
        if kind == SGD:
            p, s1 = sgd_update(p, g, s1, hyper)
        elif kind == LION:
            p, s1 = lion_update(p, g, s1, hyper)
        elif kind == RMSPROP:
            return rmsprop_update(p, g, s1, s2, hyper)
        else:
            p, s1 = adagrad_update(p, g, s1, hyper)
        return p, s1, s2

    return SimpleNamespace(block_bounds=block_bounds, search=search, stochastic_round_up=stochastic_round_up,
                           absmax_of_bits=absmax_of_bits, dequantize=dequantize, update=update,
                           lamb_moments=lamb_moments, lamb_direction=lamb_direction, lamb_apply=lamb_apply)
