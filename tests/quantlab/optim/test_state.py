"""Loaded and hand-changed optimizer states never reach a kernel unchecked: load_state_dict checks
every state against its parameter, all or nothing, and step() checks the sizes it hands the kernels.
(The fuzzer, test_state_fuzz.py, covers the corruptions at large; these are the named cases.)"""
import numpy as np
import pytest
import torch

import quantlab.optim as qo
from helpers.optim import assert_same_snapshot, snapshot
from quantlab.codes import make_code
from quantlab.kernels.lookup import STEP_VALUES, step_values


def stepped(make, sizes, seed=0, **options):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    optimizer = make(params, **options)
    for p in params:
        p.grad = torch.randn(p.shape)
    optimizer.step()
    return params, optimizer


def test_a_state_of_another_shape_is_refused_naming_parameter_and_field():
    """The crash of the issue (a 5000-element state loaded for a 40000-element parameter)."""
    _, small = stepped(qo.AdamW, [5000])
    params, large = stepped(qo.AdamW, [40000], seed=1)
    before = snapshot(large, params)
    with pytest.raises(ValueError, match=r"parameter 0 \(group 0, shape \(40000,\)\), state 'exp_avg': the "
                                         r"indices have shape \(5000,\), the parameter \(40000,\)"):
        large.load_state_dict(small.state_dict())
    assert_same_snapshot(before, snapshot(large, params))
    large.step()  # still steps, with its own state


def test_a_load_is_all_or_nothing():
    """The second parameter's state is bad: the first one's, good, is not loaded either."""
    _, source = stepped(qo.Adam, [300, 600], seed=0, block_size=64)
    params, target = stepped(qo.Adam, [300, 600], seed=1, block_size=64)
    saved = source.state_dict()
    saved["state"][1]["exp_avg_sq"] = qo.QuantizedState(torch.zeros(600, dtype=torch.uint8),
                                                        torch.full((10,), -1.0), make_code("dynamic", signed=False), 64)
    before = snapshot(target, params)
    with pytest.raises(ValueError, match=r"parameter 1 .*'exp_avg_sq': absmax values must be finite and >= 0"):
        target.load_state_dict(saved)
    assert_same_snapshot(before, snapshot(target, params))
    assert target.param_groups[0]["params"] == params


@pytest.mark.parametrize("index, message", [(15, "an index is 15, but code linear4-signed has 15 values"),
                                            (14, None)])
def test_indices_past_a_short_code_are_refused(index, message):
    code = make_code("linear", bits=4)  # 15 values: symmetric about 0
    params, optimizer = stepped(qo.SGD, [500], lr=0.1, momentum=0.9, signed_code=code, state_bits=4, min_8bit_size=0)
    saved = optimizer.state_dict()
    saved["state"][0]["momentum_buffer"].indices[7] = index
    if message is None:
        optimizer.load_state_dict(saved)
        assert optimizer.state[params[0]]["momentum_buffer"].indices[7] == index
    else:
        with pytest.raises(ValueError, match=message):
            optimizer.load_state_dict(saved)


def test_another_optimizers_state_dict_is_refused():
    _, adam = stepped(qo.Adam, [100])
    params, sgd = stepped(qo.SGD, [100], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="lacks .*a state dict of another optimizer"):
        sgd.load_state_dict(adam.state_dict())
    _, lion = stepped(qo.Lion, [100])
    with pytest.raises(ValueError, match="lacks"):
        adam.load_state_dict(lion.state_dict())


def test_a_torch_optim_state_dict_loads_and_steps():
    """torch.optim's AdamW saves no quantlab options and its step as a float tensor: it loads with
    this optimizer's options, the step as an int, the states as saved (then kept in 8 bits)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000))
    reference = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(5000)
    reference.step()
    q = torch.nn.Parameter(p.detach().clone())
    optimizer = qo.AdamW([q], lr=1e-3)
    optimizer.load_state_dict(reference.state_dict())
    state = optimizer.state[q]
    assert state["step"] == 1 and type(state["step"]) is int
    assert torch.equal(state["exp_avg"], reference.state[p]["exp_avg"])
    assert optimizer.param_groups[0]["state_bits"] == 8
    q.grad = torch.randn(5000)
    optimizer.step()
    assert isinstance(optimizer.state[q]["exp_avg"], qo.QuantizedState) and optimizer.state[q]["step"] == 2


def test_a_loaded_state_is_a_copy():
    """The kernels update states in place: two optimizers loaded from one state dict share nothing."""
    _, source = stepped(qo.Adam, [1000], min_8bit_size=0)
    saved = source.state_dict()
    kept = saved["state"][0]["exp_avg"].indices.clone()
    a_params, a = stepped(qo.Adam, [1000], seed=1, min_8bit_size=0)
    b_params, b = stepped(qo.Adam, [1000], seed=1, min_8bit_size=0)
    a.load_state_dict(saved)
    b.load_state_dict(saved)
    for p in a_params:
        p.grad = torch.randn(p.shape)
    a.step()
    assert torch.equal(saved["state"][0]["exp_avg"].indices, kept)
    assert torch.equal(b.state[b_params[0]]["exp_avg"].indices, kept)


@pytest.mark.parametrize("change", ["absmax resized", "indices resized", "float state cut", "float64 state"])
def test_step_refuses_a_state_changed_by_hand_before_writing(change):
    bits = 32 if change.startswith("float") else 8
    params, optimizer = stepped(qo.Adam, [3000], state_bits=bits, min_8bit_size=0)
    state = optimizer.state[params[0]]
    if change == "absmax resized":
        state["exp_avg"].absmax.resize_(2)
    elif change == "indices resized":
        state["exp_avg_sq"].indices.resize_(100)
    elif change == "float state cut":
        state["exp_avg"] = state["exp_avg"][:2999]
    else:
        state["exp_avg"] = state["exp_avg"].double()
    before = params[0].detach().clone()
    params[0].grad = torch.randn(3000)
    with pytest.raises(ValueError, match="does not fit it .*changed after loading"):
        optimizer.step()
    assert torch.equal(params[0], before)


def test_step_values_pad_a_short_code_with_nan():
    code = make_code("linear", bits=4)
    values = step_values(code)
    assert values.shape == (STEP_VALUES,) and not values.flags.writeable
    assert np.array_equal(values[:len(code)], code.values) and np.isnan(values[len(code):]).all()
    assert step_values(code) is values  # built once per code
    full = make_code("dynamic")
    assert np.array_equal(step_values(full), full.values)


def test_step_refuses_a_gradient_or_parameter_resized_by_hand():
    """`p.grad.data = g` and `p.data = x` skip torch's shape check: the kernels would read past g,
    or past the states, of the old size."""
    params, optimizer = stepped(qo.Adam, [5000], min_8bit_size=0)
    p = params[0]
    p.grad = torch.randn(5000)
    p.grad.data = torch.randn(10)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"a gradient must have its parameter's shape: parameter \(5000,\), "
                                         r"gradient \(10,\)"):
        optimizer.step()
    assert torch.equal(p, before)
    p.data = torch.randn(6000)
    p.grad = torch.randn(6000)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"state 'exp_avg' of a parameter of shape \(6000,\) does not fit it"):
        optimizer.step()
    assert torch.equal(p, before)
