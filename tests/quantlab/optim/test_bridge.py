"""quantlab.optim.bridge.StepBatch: CPU float32 parameters stepped in one launch per kind, state
format and hyperparameters give the bits that stepping each parameter alone gives."""
from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import quantlab.optim as qo
from helpers.optim import assert_states_equal
from quantlab.kernels import cpu

OPTIMIZERS = {
    "adam": lambda params, **kw: qo.Adam(params, lr=1e-2, **kw),
    "adamw": lambda params, **kw: qo.AdamW(params, lr=1e-2, weight_decay=0.1, **kw),
    "sgd": lambda params, **kw: qo.SGD(params, lr=1e-2, **kw),
    "sgd-momentum": lambda params, **kw: qo.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, **kw),
    "lion": lambda params, **kw: qo.Lion(params, lr=1e-3, **kw),
    "rmsprop-centred": lambda params, **kw: qo.RMSprop(params, lr=1e-3, centered=True, **kw),
    "adagrad": lambda params, **kw: qo.Adagrad(params, lr=1e-2, **kw),
}
SERIAL = cpu.SERIAL_ELEMENTS


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1),
       name=st.sampled_from(sorted(OPTIMIZERS)), state_bits=st.sampled_from([8, 32]),
       second_group_lr=st.sampled_from([None, 3e-3]))
@example(sizes=[3 * SERIAL, 5, SERIAL + 1, 700], seed=1, name="adam", state_bits=8, second_group_lr=None)
@example(sizes=[2 * SERIAL + 3, 40, SERIAL], seed=2, name="rmsprop-centred", state_bits=32, second_group_lr=3e-3)
def test_batched_step_equals_one_parameter_at_a_time(sizes, seed, name, state_bits, second_group_lr):
    """Mixed 8-bit and 32-bit states (min_8bit_size splits them), tensors on both sides of the
    serial/parallel switch, one or two param groups (other hyperparameters: another launch)."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(n, generator=gen) for n in sizes]
    grads = [[torch.randn(n, generator=gen) * 1e-2 for n in sizes] for _ in range(3)]
    options = dict(state_bits=state_bits, block_size=64, min_8bit_size=500)

    def groups(params):
        if second_group_lr is None or len(params) < 2:
            return [{"params": params}]
        return [{"params": params[::2]}, {"params": params[1::2], "lr": second_group_lr}]

    together = [torch.nn.Parameter(v.clone()) for v in values]
    alone = [torch.nn.Parameter(v.clone()) for v in values]
    batched = OPTIMIZERS[name](groups(together), **options)
    lr_of = {id(p): g.get("lr") for g in groups(alone) for p in g["params"]}
    singles = [OPTIMIZERS[name]([{"params": [p], **({"lr": lr_of[id(p)]} if lr_of[id(p)] else {})}], **options)
               for p in alone]
    for step_grads in grads:
        for p, q, g in zip(together, alone, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        batched.step()
        for opt in singles:
            opt.step()
    for i, (p, q, single) in enumerate(zip(together, alone, singles)):
        assert torch.equal(p, q), f"parameter {i}"
        assert set(batched.state[p]) == set(single.state[q])
        for key in batched.state[p]:
            assert_states_equal(batched.state[p][key], single.state[q][key], f"parameter {i} state {key}")
