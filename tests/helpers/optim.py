"""What the optimizer tests share: state layouts and comparisons, fixed training problems (a single
tensor with bitsandbytes' test gradients, a small MLP, a checkpointed model), and float32 distances."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

import quantlab.optim as qo
from quantlab import reference
from quantlab.optim.state import QUANTIZED


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float32 steps (ulps) between same-shaped float32 tensors (+0 and -0 are 0 apart)."""
    def ordered(x):
        i = x.detach().contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs()


def spread(gen, n, low, high):
    """Normal values scaled over decades [10**low, 10**high]."""
    return torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(low, high, generator=gen)


def relative_deviation(delta, delta_ref) -> float:
    delta, delta_ref = delta.double(), delta_ref.double()
    return ((delta - delta_ref).norm() / delta_ref.norm()).item()


def layout(state: dict) -> dict:
    """{state name: 8 or 32} of one parameter's optimizer state, after checking its step count and
    that 32-bit states are float32 and 8-bit ones QuantizedStates."""
    assert isinstance(state["step"], int)
    formats = {}
    for name, value in state.items():
        if name != "step":
            assert isinstance(value, qo.QuantizedState) or value.dtype == torch.float32, name
            formats[name] = 8 if isinstance(value, qo.QuantizedState) else 32
    return formats


def _fields(value) -> dict:
    """A quantized state's tensors by field name (indices, absmax or row_max and col_max)."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.type == "torch.Tensor"}


def state_tensors(state: dict) -> dict:
    """Every tensor of one parameter's optimizer state by a name: a quantized state's as NAME.indices,
    NAME.absmax (or NAME.row_max, NAME.col_max)."""
    tensors = {}
    for name, value in state.items():
        if isinstance(value, QUANTIZED):
            tensors.update({f"{name}.{field}": t for field, t in _fields(value).items()})
        elif torch.is_tensor(value):
            tensors[name] = value
    return tensors


def clone_state(value):
    if isinstance(value, QUANTIZED):
        return dataclasses.replace(value, **{field: t.clone() for field, t in _fields(value).items()})
    return value.clone() if torch.is_tensor(value) else value


def snapshot(opt, params):
    """Deep copies of the parameters and every optimizer state value."""
    state = {i: {k: clone_state(v) for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state}
    return [p.detach().clone() for p in params], state


def assert_states_equal(x, y, what):
    """Two state values equal: tensors in dtype and value, quantized states in all their parts."""
    if isinstance(x, QUANTIZED):
        assert type(y) is type(x) and (x.code, x.shape, getattr(x, "block_size", None)) == \
            (y.code, y.shape, getattr(y, "block_size", None)), what
        assert all(torch.equal(a, b) for a, b in zip(x.tensors(), y.tensors())), what
    elif torch.is_tensor(x):
        assert torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y), what
    else:
        assert x == y, what


def assert_same_snapshot(before, after):
    (params_a, state_a), (params_b, state_b) = before, after
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(a, b), f"parameter {i} changed"
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys(), f"state keys of parameter {i} changed"
        for k in state_a[i]:
            assert_states_equal(state_a[i][k], state_b[i][k], f"state {k} of parameter {i} changed")


def dequantized(state: qo.QuantizedState) -> np.ndarray:
    """A quantized state's values by the reference, flat."""
    return reference.dequantize_blockwise(state.indices.numpy(), state.absmax.numpy(), state.code,
                                          state.block_size).reshape(-1)


def flat(t):
    return t.detach().reshape(-1).numpy()


SHAPES = [(64, 32), (32,), (100, 50), (7,)]


def run_fixed_gradients(make_optimizer, steps, seed=0):
    """Several tensors, a fixed sequence of random gradients (no model, so no chaotic feedback)."""
    gen = torch.Generator().manual_seed(seed)
    params0 = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) * (1 + 0.5 * torch.randn(s, generator=gen)) + 0.1 for s in SHAPES]
             for _ in range(steps)]
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = make_optimizer(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params0, params, opt


def classification_data(seed=0, n=2048, features=32, classes=10):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    w = torch.randn(features, classes, generator=gen)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=gen)).argmax(1)
    return x, y


def mlp(seed, hidden=256, features=32, classes=10):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, classes))


def assert_same_parameters_and_states(params, opt, other_params, other_opt):
    """Parameters equal and optimizer states equal key for key, dtype included (torch.equal)."""
    for p, q in zip(params, other_params):
        assert torch.equal(p, q)
        s, t = opt.state[p], other_opt.state[q]
        assert set(s) == set(t)
        for k in s:
            assert_states_equal(s[k], t[k], k)


def train_mlp(make, steps=200, seed=0):
    """Train mlp(seed) on classification_data(seed) with the optimizer make(params) builds; batch 128.
    Returns (final full-data loss, model, optimizer)."""
    x, y = classification_data(seed)
    model = mlp(seed)
    opt = make(model.parameters())
    gen = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(x), y).item()
    return final, model, opt


def assert_8bit_trains_like_32bit(name, make, state_key, trained_below, tolerance):
    """make(bits) -> optimizer factory. The 32-bit run trains (final loss < trained_below) and the
    8-bit run's final loss is within `tolerance` (relative) of it; both really use those states."""
    loss32, _, opt32 = train_mlp(make(32))
    loss8, model8, opt8 = train_mlp(make(8))
    print(f"MLP after 200 steps, {name}: 32-bit {loss32:.5f}, 8-bit {loss8:.5f}, "
          f"gap {(loss8 - loss32) / loss32:+.4%}")
    big = [p for p in model8.parameters() if p.numel() >= 4096]
    assert len(big) == 2 and all(layout(opt8.state[p])[state_key] == 8 for p in big)  # really 8-bit
    assert all(layout(opt32.state[p])[state_key] == 32 for p in opt32.param_groups[0]["params"])
    assert loss32 < trained_below
    assert abs(loss8 - loss32) <= tolerance * loss32


def checkpoint_model(seed):
    torch.manual_seed(seed)
    # 16 * 300 = 4800 weights (8-bit with the defaults), the rest below min_8bit_size (32-bit)
    return torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.Tanh(), torch.nn.Linear(300, 4))


def checkpoint_steps(model, opt, steps, start):
    gen = torch.Generator().manual_seed(1000 + start)
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen)
        target = torch.randn(64, 4, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def run_single_tensor(make_optimizer, n, steps, seed, zero_fraction=0.0):
    """bitsandbytes' optimizer test problem: p = randn * 0.1, gradients randn * 0.01, fixed in advance;
    a zero_fraction of the elements always get a zero gradient. Returns (p0, p, optimizer, zero mask)."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=gen) * 0.1
    always_zero = torch.rand(n, generator=gen) < zero_fraction
    grads = [torch.randn(n, generator=gen) * 0.01 * (~always_zero) for _ in range(steps)]
    p = torch.nn.Parameter(p0.clone())
    opt = make_optimizer([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p0, p.detach(), opt, always_zero
