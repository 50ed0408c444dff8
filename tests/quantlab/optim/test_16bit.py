"""float16 and bfloat16 parameters: a step is the float32 step of the upcast parameter and gradient,
rounded back to the parameter's dtype (nearest even); states are float32 or 8-bit as usual.

Each optimizer is run beside a float32 twin whose parameter is reset to the upcast 16-bit one before
every step: the twin's states and rounded parameter must equal ours bit for bit, step after step.
"""
from __future__ import annotations

import io

import pytest
import torch

import quantlab.optim as qo
from quantlab.optim import bridge

OPTIMIZERS = {
    "Adam": lambda ps, **kw: qo.Adam(ps, lr=1e-2, **kw),
    "AdamW": lambda ps, **kw: qo.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "SGD": lambda ps, **kw: qo.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, **kw),
    "Lion": lambda ps, **kw: qo.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
    "RMSprop": lambda ps, **kw: qo.RMSprop(ps, lr=1e-3, centered=True, **kw),
    "Adagrad": lambda ps, **kw: qo.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1, **kw),
    "LARS": lambda ps, **kw: qo.LARS(ps, lr=1.0, weight_decay=1e-4, **kw),
    "LAMB": lambda ps, **kw: qo.LAMB(ps, lr=1e-2, weight_decay=0.01, **kw),
}
DTYPES = [torch.bfloat16, torch.float16]


def state_tensors(opt, p):
    """Every tensor of p's optimizer state by a name (a QuantizedState's as NAME.indices, NAME.absmax)."""
    tensors = {}
    for name, value in opt.state[p].items():
        if isinstance(value, qo.QuantizedState):
            tensors.update({f"{name}.indices": value.indices, f"{name}.absmax": value.absmax})
        elif torch.is_tensor(value):
            tensors[name] = value
    return tensors


def run_beside_float32_twin(make, dtype, n, steps, state_bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p16 = torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype))
    p32 = torch.nn.Parameter(p16.detach().float())
    ours, twin = make([p16], state_bits=state_bits), make([p32], state_bits=state_bits)
    for step in range(steps):
        g16 = (torch.randn(n, generator=gen) * 0.1).to(dtype)
        p16.grad, p32.grad = g16, g16.float()
        with torch.no_grad():
            p32.copy_(p16.float())
        ours.step()
        twin.step()
        assert p16.dtype == dtype
        assert torch.equal(p16.detach(), p32.detach().to(dtype)), f"step {step}: parameters differ"
        ours_states, twin_states = state_tensors(ours, p16), state_tensors(twin, p32)
        assert ours_states.keys() == twin_states.keys()
        for key, value in ours_states.items():
            assert value.dtype == twin_states[key].dtype, key
            assert torch.equal(value, twin_states[key]), f"step {step}: state {key} differs"
    return p16, ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("state_bits", [8, 32])
def test_16bit_step_is_the_rounded_float32_step(name, dtype, state_bits):
    p, opt = run_beside_float32_twin(OPTIMIZERS[name], dtype, n=5000, steps=4, state_bits=state_bits)
    float_states = [v for k, v in state_tensors(opt, p).items() if not k.endswith(".indices")]
    assert float_states and all(v.dtype == torch.float32 for v in float_states)


@pytest.mark.parametrize("name", ["AdamW", "LAMB", "SGD"])
def test_16bit_parameters_are_stepped_in_chunks_of_whole_blocks(monkeypatch, name):
    # 1300 elements in chunks of 512 (two 256-element blocks): three chunks, the last one partial.
    monkeypatch.setattr(bridge, "CHUNK_ELEMENTS", 512)
    run_beside_float32_twin(OPTIMIZERS[name], torch.bfloat16, n=1300, steps=3, state_bits=8)
    run_beside_float32_twin(lambda ps, **kw: OPTIMIZERS[name](ps, min_8bit_size=0, **kw), torch.float16,
                            n=1300, steps=3, state_bits=8)


def test_16bit_parameters_move():
    # the twin test would pass if neither parameter moved: check that they do
    p, _ = run_beside_float32_twin(OPTIMIZERS["AdamW"], torch.bfloat16, n=5000, steps=3, state_bits=8, seed=3)
    start = torch.randn(5000, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert (p.detach() != start).float().mean() > 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_16bit_gradient_raises_and_changes_nothing(dtype, value):
    p = torch.nn.Parameter(torch.randn(5000).to(dtype))
    opt = qo.AdamW([p])
    p.grad = torch.randn(5000).to(dtype)
    opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in state_tensors(opt, p).items()}
    p.grad[1234] = value
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    for key, value in state_tensors(opt, p).items():
        assert torch.equal(value, before[1][key]), key


@pytest.mark.parametrize("state_bits", [8, 32])
def test_bfloat16_state_dict_round_trip_keeps_float32_states(state_bits):
    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))
        return model.to(torch.bfloat16)

    def train(model, opt, steps, start):
        gen = torch.Generator().manual_seed(start)
        for _ in range(steps):
            x = torch.randn(32, 64, generator=gen).to(torch.bfloat16)
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()

    straight = make(0)
    opt = qo.AdamW(straight.parameters(), lr=1e-2, state_bits=state_bits)
    train(straight, opt, 3, start=1)
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "opt": opt.state_dict()}, buffer)
    train(straight, opt, 3, start=2)

    resumed = make(1)
    opt2 = qo.AdamW(resumed.parameters(), lr=1e-2, state_bits=state_bits)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for p in resumed.parameters():
        for key, value in state_tensors(opt2, p).items():
            assert value.dtype == (torch.uint8 if key.endswith(".indices") else torch.float32), key
    train(resumed, opt2, 3, start=2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
