"""Quantization studies: seeded data, error tables over codes and block sizes, the outlier study,
and Adam states captured from real training. The notebooks (``notebooks/``) and the paper figures
(``paper_figs/``) call these functions; they hold no analysis logic of their own.

Round trips run on ``quantlab.kernels`` (bit-identical to ``quantlab.reference``, tens of times
faster); codes come from ``quantlab.codes`` (``make_code``, ``family_codes``) and error measures from
``quantlab.metrics``. ``import quantlab.analysis`` loads NumPy only: the Numba kernels load on the
first round trip, torch in :func:`capture_adam_states` / :func:`minibatches`.

Block sizes are positive integers or ``"tensor"``: one block for the whole tensor, i.e. plain
tensor-wise absmax quantization (the same numbers as a block size of ``x.size``).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

from . import metrics
from .codes import FAMILIES, Code, family_codes

TENSOR = "tensor"
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096, TENSOR)
BITS = (3, 4, 5, 6, 7, 8)
DATA = {  # sample_data names -> labels used in tables and figures
    "normal": "normal",
    "t2": "heavy-tailed t(2)",
    "adam_m": "Adam m",
    "adam_v": "Adam v",
}


# --- data ---------------------------------------------------------------------------------------

def adam_moments(n: int, steps: int = 100, seed: int = 0):
    """Adam's m and v (beta1 0.9, beta2 0.999, no bias correction) after ``steps`` steps on
    heavy-tailed gradients (Student t, 3 degrees of freedom) whose per-parameter scales are spread
    log-uniformly over four orders of magnitude (1e-4 .. 1). Returns float32 ``(m, v)`` (new arrays)."""
    m, v = _adam_moments(int(n), int(steps), int(seed))
    return m.copy(), v.copy()


@functools.lru_cache(maxsize=4)
def _adam_moments(n: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(np.log(1e-4), np.log(1.0), n))  # per-parameter gradient scale
    m = np.zeros(n)
    v = np.zeros(n)
    for _ in range(steps):
        g = scale * rng.standard_t(3, n)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
    return m.astype(np.float32), v.astype(np.float32)


def sample_data(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` float32 values of a named distribution, reproducible from ``seed``.

    ``"normal"``: standard normal; ``"t2"``: Student t with 2 degrees of freedom (infinite variance,
    rare huge values); ``"adam_m"`` / ``"adam_v"``: Adam's first / second moment from
    :func:`adam_moments` (signed, heavy-tailed / non-negative, spanning ~8 orders of magnitude).
    """
    if name not in DATA:
        raise ValueError(f"unknown data {name!r}; choose one of {sorted(DATA)}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rng = np.random.default_rng(seed)
    if name == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if name == "t2":
        return rng.standard_t(2, n).astype(np.float32)
    m, v = adam_moments(n, seed=seed)
    return m if name == "adam_m" else v


def sample_datasets(n: int, seed: int = 0, names: Iterable[str] = tuple(DATA)) -> dict[str, np.ndarray]:
    """``{label: sample_data(name, n, seed)}`` for each name (labels from ``DATA``)."""
    return {DATA[name]: sample_data(name, n, seed) for name in names}


# --- round trips and error tables -----------------------------------------------------------------

def resolve_block_size(block_size, n: int) -> int:
    """An integer block size: ``"tensor"`` -> n."""
    if block_size == TENSOR:
        return int(n)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer or {TENSOR!r}, got {block_size!r}")
    return int(block_size)


def roundtrip(x, code: Code, block_size=256) -> np.ndarray:
    """``dequantize(quantize(x))`` block-wise (nearest rounding) with the fast kernels; float32,
    shaped like ``x``."""
    from . import kernels

    x = np.ascontiguousarray(x, dtype=np.float32)
    block_size = resolve_block_size(block_size, x.size)
    with _kernel_threads(x.size):
        q, absmax = kernels.quantize_blockwise(x, code, block_size)
        return kernels.dequantize_blockwise(q, absmax, code, block_size)


SMALL = 2**20  # below this many elements the kernels run on one thread: faster than waking others


@contextlib.contextmanager
def _kernel_threads(n: int):
    import numba

    before = numba.get_num_threads()
    if n < SMALL and before > 1:
        numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _parts(x) -> list[np.ndarray]:
    """A data entry of error_table as a list of flat float32 arrays, each quantized on its own."""
    parts = list(x.values()) if isinstance(x, Mapping) else list(x) if isinstance(x, (list, tuple)) else [x]
    return [np.ascontiguousarray(p, dtype=np.float32).reshape(-1) for p in parts]


def error_table(data: Mapping, codes: Mapping[str, Code | Callable], block_sizes=BLOCK_SIZES,
                measures: Iterable[str] = metrics.DEFAULT_MEASURES) -> list[dict]:
    """One row per data set x code x block size: quantize block-wise, dequantize, measure.

    ``data`` maps a name to an array, or to a list or dict of arrays (e.g. one optimizer state per
    parameter): each is then quantized on its own, as an optimizer does (``"tensor"`` = one block
    per array), and the measures pool all their elements. ``codes`` maps a label to a Code, or to a
    callable taking the (concatenated) data and returning a Code, or None to skip that data set
    (e.g. ``quantlab.codes.family_codes``). Rows: ``data``, ``code`` (the label), ``code_name``,
    ``bits``, ``code_values``, ``block_size`` (int or ``"tensor"``), ``n`` and one entry per measure
    (names of ``quantlab.metrics.MEASURES``).
    """
    measures = tuple(measures)
    rows = []
    for data_name, entry in data.items():
        parts = _parts(entry)
        x = np.concatenate(parts) if len(parts) > 1 else parts[0]
        for label, code in codes.items():
            code = code if isinstance(code, Code) else code(x)
            if code is None:
                continue
            for block_size in block_sizes:
                x_hat = np.concatenate([roundtrip(p, code, block_size) for p in parts])
                rows.append({"data": data_name, "code": label, "code_name": code.name, "bits": code.bits,
                             "code_values": len(code), "block_size": block_size, "n": int(x.size),
                             **metrics.error_measures(x, x_hat, measures)})
    return rows


def bit_sweep(data: Mapping[str, np.ndarray], bits: Iterable[int] = BITS, families: Iterable[str] = FAMILIES,
              block_sizes=(256,), measures: Iterable[str] = metrics.DEFAULT_MEASURES) -> list[dict]:
    """:func:`error_table` of each code family at each bit width (``code`` = family, ``bits`` set)."""
    families = tuple(families)
    return [row for b in bits for row in error_table(data, family_codes(b, families), block_sizes, measures)]


def select(rows: Iterable[dict], **where) -> list[dict]:
    """The rows whose fields equal every ``where`` value."""
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def value(rows: Iterable[dict], column: str, **where):
    """``column`` of the one row matching ``where`` (raises unless exactly one matches)."""
    found = select(rows, **where)
    if len(found) != 1:
        raise LookupError(f"{len(found)} rows match {where}, expected exactly 1")
    return found[0][column]


# --- outliers -------------------------------------------------------------------------------------

PLACEMENTS = ("one per tensor", "one per block")


def insert_outliers(x, block_size, magnitude: float, placement: str = "one per tensor", seed: int = 0):
    """A copy of ``x`` with outliers of value ``magnitude * max|x|`` (positive) at random positions:
    one in the whole tensor, or one in every block of ``block_size``. Returns ``(y, is_outlier)``.
    The tensor-wide position depends on ``seed`` only, not on the block size."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    block_size = resolve_block_size(block_size, n)
    rng = np.random.default_rng(seed)
    if placement == "one per tensor":
        positions = rng.integers(0, n, size=1)
    elif placement == "one per block":
        starts = np.arange(0, n, block_size)
        lengths = np.minimum(block_size, n - starts)
        positions = starts + (rng.random(starts.size) * lengths).astype(np.int64)
    else:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    y = x.copy()
    y[positions] = np.float32(magnitude * float(np.max(np.abs(x))))
    is_outlier = np.zeros(n, bool)
    is_outlier[positions] = True
    return y, is_outlier


def outlier_study(x, code: Code, block_sizes=(64, 256, 1024, 4096), magnitudes=(1, 10, 100, 1000),
                  placements=PLACEMENTS, seed: int = 0) -> list[dict]:
    """How one outlier per tensor, or one per block, degrades the *other* elements.

    For each block size B, outlier magnitude M (multiples of max|x|) and placement, outliers are
    inserted into ``x`` (:func:`insert_outliers`) and the result is quantized block-wise with B and
    as one block (tensor-wise). Rows give, over the non-outlier elements only: ``blockwise_error``
    and ``tensorwise_error`` (relative L2 errors), the same for ``x`` without outliers
    (``clean_blockwise_error``, ``clean_tensorwise_error``), the zero-rounding fractions, and
    ``affected_fraction``: the share of them that sit in a block holding an outlier, and
    ``confined_estimate``: sqrt((1 - a) * clean_blockwise_error**2 + a * tensorwise_error**2) with a
    the affected fraction, the error to expect if an outlier harms its own block only.
    """
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    clean_tensor = roundtrip(x, code, TENSOR)
    rows = []
    for block_size in block_sizes:
        b = resolve_block_size(block_size, n)
        clean_block = roundtrip(x, code, b)
        for placement in placements:
            for magnitude in magnitudes:
                y, is_outlier = insert_outliers(x, b, magnitude, placement, seed)
                rest = ~is_outlier
                hit_blocks = np.unique(np.flatnonzero(is_outlier) // b)
                in_hit_block = np.isin(np.arange(n) // b, hit_blocks)
                blockwise, tensorwise = roundtrip(y, code, b), roundtrip(y, code, TENSOR)
                measures = ("relative_error", "zero_rounding_fraction")
                bw = metrics.error_measures(x[rest], blockwise[rest], measures)
                tw = metrics.error_measures(x[rest], tensorwise[rest], measures)
                rows.append({
                    "code": code.name, "block_size": block_size, "placement": placement, "magnitude": magnitude,
                    "outliers": int(is_outlier.sum()),
                    "blockwise_error": bw["relative_error"], "tensorwise_error": tw["relative_error"],
                    "clean_blockwise_error": metrics.relative_error(x[rest], clean_block[rest]),
                    "clean_tensorwise_error": metrics.relative_error(x[rest], clean_tensor[rest]),
                    "blockwise_zero_rounding": bw["zero_rounding_fraction"],
                    "tensorwise_zero_rounding": tw["zero_rounding_fraction"],
                    "affected_fraction": float(np.mean(in_hit_block[rest])),
                })
                a, row = rows[-1]["affected_fraction"], rows[-1]
                # the damage confined to the outliers' blocks: those elements get the tensor-wise
                # error (their block's absmax is the tensor's), the others the clean block-wise one
                row["confined_estimate"] = math.sqrt((1 - a) * row["clean_blockwise_error"] ** 2
                                                     + a * row["tensorwise_error"] ** 2)
    return rows


# --- Adam states from training --------------------------------------------------------------------

@dataclass
class AdamStates:
    """Snapshots of Adam's states: ``m[name][i]`` and ``v[name][i]`` are float32 arrays shaped like
    parameter ``name`` after step ``steps[i]``, and ``next_grad[name][i]`` the gradient of the step
    after it (the one the stored states meet next); ``losses[t]`` is the loss of step t + 1."""

    steps: list[int]
    losses: list[float] = field(default_factory=list)
    m: dict[str, list[np.ndarray]] = field(default_factory=dict)
    v: dict[str, list[np.ndarray]] = field(default_factory=dict)
    next_grad: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def tensors(self, state: str, snapshot: int = -1) -> dict[str, np.ndarray]:
        """``{parameter name: array}`` of state ``"m"`` or ``"v"`` at one snapshot (default the last)."""
        return {name: arrays[snapshot] for name, arrays in getattr(self, state).items()}

    def flat(self, state: str, snapshot: int = -1) -> np.ndarray:
        """Every parameter's state at one snapshot, flattened and concatenated."""
        return np.concatenate([a.reshape(-1) for a in self.tensors(state, snapshot).values()])

    def summary(self) -> list[dict]:
        """:func:`distribution_summary` of m and v of every parameter at every snapshot (with
        ``step`` and ``state`` columns)."""
        return [{"step": step, "state": state, **row} for i, step in enumerate(self.steps) for state in ("m", "v")
                for row in distribution_summary(self.tensors(state, i))]


def minibatches(inputs, targets, batch_size: int, seed: int = 0) -> Callable:
    """``data_fn`` for :func:`capture_adam_states`: step -> a random batch (torch tensors), the same
    batch for the same (seed, step)."""
    import torch

    inputs, targets = torch.as_tensor(inputs), torch.as_tensor(targets)

    def data_fn(step: int):
        index = np.random.default_rng([seed, step]).choice(len(inputs), batch_size, replace=False)
        index = torch.from_numpy(index)
        return inputs[index], targets[index]

    return data_fn


def capture_adam_states(model_fn: Callable, data_fn: Callable, steps: int, seed: int = 0,
                        snapshot_steps: Iterable[int] | None = None, optimizer: str = "quantlab",
                        loss_fn: Callable | None = None, **adam_options) -> AdamStates:
    """Train ``model_fn()`` for ``steps`` steps with AdamW and 32-bit states; return m and v.

    ``torch.manual_seed(seed)`` runs before ``model_fn()``. Step t (1-based) trains on
    ``data_fn(t) -> (inputs, targets)`` with ``loss_fn(model(inputs), targets)`` (default cross
    entropy). ``optimizer``: ``"quantlab"`` (``quantlab.optim.AdamW(state_bits=32)``) or ``"torch"``
    (``torch.optim.AdamW``); ``adam_options`` (lr, betas, eps, weight_decay) go to it. States are
    copied after each step in ``snapshot_steps`` (default: the last), and the gradient of the step
    after it (computed without stepping after the last step).
    """
    import torch

    snapshot_steps = sorted(set([steps] if snapshot_steps is None else snapshot_steps))
    if not snapshot_steps or snapshot_steps[0] < 1 or snapshot_steps[-1] > steps:
        raise ValueError(f"snapshot_steps must lie in 1..{steps}, got {snapshot_steps}")
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    torch.manual_seed(seed)
    model = model_fn()
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if optimizer == "quantlab":
        from .optim import AdamW

        opt = AdamW([p for _, p in params], state_bits=32, **adam_options)
    elif optimizer == "torch":
        opt = torch.optim.AdamW([p for _, p in params], **adam_options)
    else:
        raise ValueError(f"optimizer must be 'quantlab' or 'torch', got {optimizer!r}")
    result = AdamStates(steps=snapshot_steps, m={name: [] for name, _ in params}, v={name: [] for name, _ in params},
                        next_grad={name: [] for name, _ in params})
    for step in range(1, steps + 2):
        inputs, targets = data_fn(step)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        if step - 1 in snapshot_steps:
            for name, p in params:
                result.next_grad[name].append(p.grad.detach().cpu().numpy().astype(np.float32, copy=True))
        if step > steps:
            break
        opt.step()
        result.losses.append(float(loss.detach()))
        if step in snapshot_steps:
            for name, p in params:
                state = opt.state[p]
                result.m[name].append(state["exp_avg"].detach().cpu().numpy().copy())
                result.v[name].append(state["exp_avg_sq"].detach().cpu().numpy().copy())
    return result


def distribution_summary(arrays: Mapping[str, np.ndarray]) -> list[dict]:
    """Per array: size, zero fraction, |x| quantiles (median, 99th percentile, max) and the span of its
    non-zero magnitudes in decades (log10 of max|x| / min non-zero |x|)."""
    rows = []
    for name, x in arrays.items():
        a = np.abs(np.asarray(x, dtype=np.float64).reshape(-1))
        nonzero = a[a > 0]
        rows.append({
            "tensor": name, "n": int(a.size), "zero_fraction": float(np.mean(a == 0)),
            "median_abs": float(np.median(a)), "p99_abs": float(np.quantile(a, 0.99)), "max_abs": float(a.max()),
            "decades": float(np.log10(nonzero.max() / nonzero.min())) if nonzero.size else 0.0,
        })
    return rows


def adam_update_error(m, v, m_code: Code, v_code: Code, block_size=256, grad=None, step: int | None = None,
                      betas=(0.9, 0.999), eps: float = 1e-8) -> dict:
    """Error of Adam's update direction when m and v are stored block-wise quantized.

    Without ``grad``: the update m / (sqrt(v) + eps) from the stored states themselves. With ``grad``
    (the next step's gradient): the next update, as an 8-bit Adam step computes it (quantlab.optim,
    bitsandbytes): dequantize, m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2, update
    m' / (sqrt(v') + eps), compared with the same from the unquantized states. With ``step`` (the
    states' step count), m and v are bias-corrected as Adam does. Returns the update's relative L2
    error; ``blown_up_fraction``, the share of elements whose update is over 10x the exact one in
    magnitude, and ``blown_up_with_v_lost``, the share of those whose non-zero v was stored as 0 (which
    leaves m / eps where no gradient arrives); and ``v_zero_rounding``, the share of non-zero v
    stored as 0.
    """
    m = np.asarray(m, dtype=np.float32).reshape(-1)
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    if m.shape != v.shape or (grad is not None and np.size(grad) != m.size):
        raise ValueError(f"m ({m.size}), v ({v.size}) and grad must have the same size")
    m_hat, v_hat = roundtrip(m, m_code, block_size), roundtrip(v, v_code, block_size)
    b1, b2 = betas
    t = None if step is None else step + (grad is not None)

    def update(m_, v_):
        m_, v_ = m_.astype(np.float64), v_.astype(np.float64)
        if grad is not None:
            g = np.asarray(grad, dtype=np.float64).reshape(-1)
            m_, v_ = b1 * m_ + (1 - b1) * g, b2 * v_ + (1 - b2) * g * g
        if t is not None:
            m_, v_ = m_ / (1 - b1**t), v_ / (1 - b2**t)
        return m_ / (np.sqrt(v_) + eps)

    exact, quantized = update(m, v), update(m_hat, v_hat)
    blown_up = np.abs(quantized) > 10 * np.abs(exact) + 1e-12
    v_lost = (v != 0) & (v_hat == 0)
    return {"relative_error": metrics.relative_error(exact, quantized),
            "blown_up_fraction": float(np.mean(blown_up)),
            "blown_up_with_v_lost": float(np.mean(v_lost[blown_up])) if blown_up.any() else math.nan,
            "v_zero_rounding": metrics.zero_rounding_fraction(v, v_hat)}


def update_error_table(states: AdamStates, m_code: Code, v_code: Code, block_sizes=BLOCK_SIZES,
                       with_next_grad: bool = True, **options) -> list[dict]:
    """:func:`adam_update_error` of every parameter at every snapshot and block size (rows:
    ``step``, ``tensor``, ``block_size``, ``n`` and the measures), bias-corrected at each snapshot's
    step; ``with_next_grad`` uses the recorded next gradient (the 8-bit step's view)."""
    rows = []
    for i, step in enumerate(states.steps):
        for name in states.m:
            grad = states.next_grad[name][i] if with_next_grad else None
            for block_size in block_sizes:
                got = adam_update_error(states.m[name][i], states.v[name][i], m_code, v_code, block_size, grad,
                                        step, **options)
                rows.append({"step": step, "tensor": name, "block_size": block_size,
                             "n": int(states.m[name][i].size), **got})
    return rows
