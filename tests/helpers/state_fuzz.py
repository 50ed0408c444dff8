"""Fuzzing ``BlockwiseOptimizer.load_state_dict`` with corrupted state dicts.

Run as ``python -m helpers.state_fuzz EXAMPLES SEED`` (from tests/, as
tests/quantlab/optim/test_state_fuzz.py does, in a process of its own: a kernel writing out of
bounds aborts the process, which must fail the test rather than end the test run). Each example
saves the state of a stepped optimizer (one of the eight, in one of the FORMATS, two parameters: a
matrix, which rank-1 normalises, and a vector), corrupts
it one way and loads it into a stepped optimizer of the same kind. The load must either

- raise ValueError or TypeError, leaving the optimizer exactly as it was, or
- succeed (only the value-preserving changes may) and then step bit for bit like an optimizer that
  loaded the uncorrupted state.

Prints one JSON line: examples tried, how many were refused and loaded, per corruption.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections import Counter

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import quantlab.optim as qo
from helpers.optim import assert_same_snapshot, snapshot
from quantlab import reference
from quantlab.codes import make_code
from quantlab.optim.state import QUANTIZED

SHAPES = ((20, 15), (1000,))  # two parameters: states of different sizes to swap
BLOCK_SIZE = 128
# state options by format; short codes (fewer values than their bits hold) so that an index can be
# out of range: linear signed codes have 2**bits - 1 values
FORMATS = {
    "32-bit": dict(state_bits=32),
    "5-bit, one a byte": dict(state_bits=5, signed_code=make_code("linear", bits=5),
                              unsigned_code=make_code("linear", bits=5, signed=False)),
    "4-bit, packed": dict(state_bits=4, signed_code=make_code("linear", bits=4),
                          unsigned_code=make_code("linear-zero-free", bits=4, signed=False)),
    "4-bit, rank-1": dict(state_bits=4, signed_code=make_code("linear", bits=4),
                          unsigned_code=make_code("linear-zero-free", bits=4, signed=False),
                          unsigned_normalization="rank1"),
}
OPTIMIZERS = {
    "adam": lambda ps, **o: qo.Adam(ps, **o),
    "adamw": lambda ps, **o: qo.AdamW(ps, **o),
    "sgd": lambda ps, **o: qo.SGD(ps, lr=0.01, momentum=0.9, **o),
    "rmsprop": lambda ps, **o: qo.RMSprop(ps, **o),
    "adagrad": lambda ps, **o: qo.Adagrad(ps, **o),
    "lion": lambda ps, **o: qo.Lion(ps, **o),
    "lamb": lambda ps, **o: qo.LAMB(ps, **o),
    "lars": lambda ps, **o: qo.LARS(ps, lr=0.1, **o),
}
# Corruptions that keep every value (the load must succeed and step like the original); the rest
# must be refused, naming the parameter unless the fault is in the param groups.
PRESERVING = {"none", "step as a tensor", "float state not contiguous"}
GROUP_LEVEL = {"another optimizer", "fewer groups", "fewer params", "group lacks a default", "state dict not a dict"}
# Changes to a loaded optimizer's state in place that the next step() must refuse before writing.
AFTER_LOAD = ["truncated", "extended", "dtype", "not a tensor", "block size changed"]
CORRUPTIONS = sorted(PRESERVING | {
    "truncated", "extended", "reshaped", "dtype", "absmax NaN", "absmax negative", "absmax Inf",
    "index out of range", "missing key", "extra key", "step float", "step negative", "step string",
    "states swapped", "another optimizer", "fewer groups", "fewer params", "group lacks a default",
    "block size changed", "not a tensor", "state not a dict", "state dict not a dict",
})
counts = {"examples": 0, "refused": Counter(), "loaded": Counter()}


def make(kind: str, bits: str, seed: int, dtype=torch.float32):
    """Parameters and an optimizer of ``kind`` with states in format ``bits`` (one of FORMATS; LAMB
    has no rank-1 states and keeps them packed) after two steps from seeded gradients."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in SHAPES]
    bits = "4-bit, packed" if kind == "lamb" and bits == "4-bit, rank-1" else bits
    options = {"block_size": BLOCK_SIZE, "min_8bit_size": 0, **FORMATS[bits]}
    optimizer = OPTIMIZERS[kind](params, **options)
    step(params, optimizer, seed)
    step(params, optimizer, seed + 1)
    return params, optimizer


def step(params, optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
    optimizer.step()


def a_state(saved: dict, name_choice: int, want_quantized: bool | None = None):
    """(param index, state name) of one state of the saved dict, chosen by ``name_choice``."""
    entries = [(i, name) for i, per_param in sorted(saved["state"].items()) for name in sorted(per_param)
               if name != "step" and (want_quantized is None
                                      or isinstance(per_param[name], QUANTIZED) == want_quantized)]
    return entries[name_choice % len(entries)] if entries else None


def corrupt(saved: dict, corruption: str, kind: str, bits: int, choice: int) -> bool:
    """Applies ``corruption`` to ``saved`` in place; False where it does not apply to this state."""
    quantized = a_state(saved, choice, want_quantized=True)
    target = a_state(saved, choice)
    if corruption == "none":
        return True
    if corruption in ("truncated", "extended", "reshaped", "dtype", "not a tensor"):
        if target is None:
            return False
        i, name = target
        value = saved["state"][i][name]
        names = [f.name for f in dataclasses.fields(value) if f.type == "torch.Tensor"] if isinstance(
            value, QUANTIZED) else []
        field = names[choice % len(names)] if names else None
        tensor = getattr(value, field) if field else value
        if corruption == "truncated":
            tensor = tensor.reshape(-1)[:max(tensor.numel() - 1 - choice % 7, 0)].clone()
        elif corruption == "extended":
            tensor = torch.cat([tensor.reshape(-1), tensor.reshape(-1)[:1 + choice % 300]])
        elif corruption == "reshaped":
            tensor = tensor.reshape(-1, 1)
        elif corruption == "dtype":
            dtypes = [torch.float64, torch.float16, torch.int32, torch.uint8, torch.int8]
            tensor = tensor.to([d for d in dtypes if d != tensor.dtype][choice % 4])
        else:
            tensor = tensor.tolist()
        if field is None:
            saved["state"][i][name] = tensor
        else:  # a quantized state rebuilt around the bad field is refused on construction, like torch.load
            try:
                saved["state"][i][name] = dataclasses.replace(value, **{field: tensor})
            except (TypeError, ValueError):
                object.__setattr__(value, field, tensor)  # as a state changed in place would be
        return True
    if corruption.startswith("absmax") or corruption in ("index out of range", "block size changed"):
        if quantized is None:
            return False
        i, name = quantized
        value = saved["state"][i][name]
        if corruption == "index out of range":
            if value.code.bits in reference.PACKED_BITS:
                if len(value.code) == 2**value.code.bits:
                    return False  # every field of a byte is a valid index
                value.indices.view(-1)[choice % value.indices.numel()] = 255  # every field 2**bits - 1
            else:
                value.indices.view(-1)[choice % value.indices.numel()] = len(value.code) + choice % (
                    256 - len(value.code))
        elif corruption == "block size changed":
            if not isinstance(value, qo.QuantizedState):
                return False
            object.__setattr__(value, "block_size", BLOCK_SIZE // 2)
        else:
            bad = {"absmax NaN": float("nan"), "absmax negative": -1.0, "absmax Inf": float("inf")}[corruption]
            scales = value.tensors()[1 + choice % (len(value.tensors()) - 1)]
            scales[choice % scales.numel()] = bad
        return True
    if corruption == "float state not contiguous":
        if target is None or isinstance(saved["state"][target[0]][target[1]], QUANTIZED):
            return False
        i, name = target
        value = saved["state"][i][name]
        saved["state"][i][name] = torch.stack([value, value], dim=1)[:, 0]  # same values, stride 2
        return True
    if corruption in ("missing key", "extra key", "state not a dict"):
        i = sorted(saved["state"])[choice % len(saved["state"])]
        if corruption == "missing key":
            del saved["state"][i][sorted(saved["state"][i])[choice % len(saved["state"][i])]]
        elif corruption == "extra key":
            saved["state"][i]["max_exp_avg_sq"] = torch.zeros(SHAPES[i])
        else:
            saved["state"][i] = list(saved["state"][i].items())
        return True
    if corruption.startswith("step"):
        i = sorted(saved["state"])[choice % len(saved["state"])]
        steps = saved["state"][i]["step"]
        saved["state"][i]["step"] = {"step float": steps + 0.5, "step negative": -1 - steps, "step string": str(steps),
                                     "step as a tensor": torch.tensor(float(steps))}[corruption]
        return True
    if corruption == "states swapped":
        saved["state"][0], saved["state"][1] = saved["state"][1], saved["state"][0]
        return True
    if corruption == "another optimizer":
        _, other = make(sorted(set(OPTIMIZERS) - {kind})[choice % (len(OPTIMIZERS) - 1)], bits, choice)
        if set(saved["param_groups"][0]) <= set(other.param_groups[0]):
            return False  # it has every hyperparameter of this one (Adam's into LAMB): loads, as in torch
        saved.clear()
        saved.update(other.state_dict())
        return True
    if corruption == "fewer groups":
        saved["param_groups"] = []
        return True
    if corruption == "fewer params":
        saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][:1]
        return True
    if corruption == "group lacks a default":
        group = saved["param_groups"][0]
        hyperparameters = sorted(k for k in group if k not in ("params", *qo.optimizer.STATE_OPTIONS))
        del group[hyperparameters[choice % len(hyperparameters)]]
        return True
    if corruption == "state dict not a dict":
        saved["state"] = list(saved["state"].values())
        return True
    raise ValueError(f"unknown corruption {corruption!r}")


@given(kind=st.sampled_from(sorted(OPTIMIZERS)), bits=st.sampled_from(sorted(FORMATS)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), after_load=st.booleans(),
       corruption=st.sampled_from(CORRUPTIONS), choice=st.integers(0, 10_000), seed=st.integers(0, 2**16))
def fuzz_load(kind, bits, dtype, after_load, corruption, choice, seed):
    if after_load:
        return fuzz_step(kind, bits, dtype, AFTER_LOAD[choice % len(AFTER_LOAD)], choice, seed)
    source_params, source = make(kind, bits, seed, dtype)
    saved = copy.deepcopy(source.state_dict())
    if not corrupt(saved, corruption, kind, bits, choice):
        return
    counts["examples"] += 1
    params, optimizer = make(kind, bits, seed + 7, dtype)
    before, options = snapshot(optimizer, params), copy.deepcopy(optimizer.param_groups[0])
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, TypeError) as error:
        assert corruption not in PRESERVING, f"{corruption}: a value-preserving change refused: {error}"
        assert corruption in GROUP_LEVEL or "parameter " in str(error), f"{corruption}: which parameter? {error}"
        assert_same_snapshot(before, snapshot(optimizer, params))  # a refused load changes nothing
        assert {k: v for k, v in options.items() if k != "params"} == \
            {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}, f"{corruption}: options changed"
        step(params, optimizer, seed + 2)  # still steps
        counts["refused"][corruption] += 1
        return
    assert corruption in PRESERVING, f"{corruption}: loaded without a word"
    for p, q in zip(params, source_params):
        p.data.copy_(q.detach())
    step(params, optimizer, seed + 2)
    step(source_params, source, seed + 2)
    assert_same_snapshot(snapshot(source, source_params), snapshot(optimizer, params))
    counts["loaded"][corruption] += 1


def fuzz_step(kind, bits, dtype, corruption, choice, seed):
    """A state changed in place after loading: step() must refuse it before writing anything."""
    params, optimizer = make(kind, bits, seed, dtype)
    in_place = {"state": {i: optimizer.state[p] for i, p in enumerate(params)}}  # the optimizer's own dicts
    if not corrupt(in_place, corruption, kind, bits, choice):
        return
    counts["examples"] += 1
    before = [p.detach().clone() for p in params]
    try:
        step(params, optimizer, seed + 2)
    except ValueError as error:
        assert "changed after loading" in str(error), f"after load, {corruption}: {error}"
        assert all(map(torch.equal, params, before)), f"after load, {corruption}: parameters written"
        counts["refused"][f"after load: {corruption}"] += 1
        return
    raise AssertionError(f"after load, {corruption}: stepped without a word")


def main(examples: int, seed: int) -> None:
    run = settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    hypothesis_seed(seed)(run(fuzz_load))()
    print(json.dumps({"examples": counts["examples"], "refused": dict(counts["refused"]),
                      "loaded": dict(counts["loaded"])}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
