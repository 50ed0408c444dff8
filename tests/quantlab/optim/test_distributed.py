"""quantlab optimizers under torch.distributed on the CPU: 2 gloo ranks (one spawned job, see
tests/helpers/distributed_workers.py) against single-process runs on the same global batches.

- DistributedDataParallel: each rank's gradient is halved, then the ranks' halves are summed (shown
  with subnormal gradients, where halving is inexact), so one process that computes the two
  half-batch gradients and forms g0/2 + g1/2 has the same gradients bit for bit, hence the same
  parameters and 8-bit states. Against the full-batch gradient only summation order differs.
- ZeroRedundancyOptimizer: each rank keeps the state of its share of the parameters and steps
  them with the same kernels: bit-identical; checkpoints move between 2 ranks and 1 process.
- FSDP2 (fully_shard, which runs with gloo on the CPU in torch 2.14): each rank steps its shard,
  so 8-bit blocks follow the shards: bit-identical to one process stepping each shard as a
  tensor of its own; 32-bit elementwise states bit-identical to the unsharded run.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import quantlab.optim as qo
from experiments.bench.distributed import launch
from helpers.distributed_workers import (
    DDP_CASES,
    OPTIMIZERS,
    RESUME_STEPS,
    STEPS,
    SUBNORMAL_SCALE,
    WORLD_SIZE,
    distributed_job,
    global_batch,
    make_model,
    mean_loss,
    rank_half,
)

JOB_TIMEOUT_S = 150  # the job takes ~15 s alone on 2 cores; a hang fails the tests instead of stalling them


# --- single-process references ------------------------------------------------------------------

def half_batch_gradients(model, step: int, scale=1.0):
    """Per rank's half of the global batch: the gradients of its mean loss."""
    halves = []
    for rank in range(WORLD_SIZE):
        model.zero_grad()
        mean_loss(model, *rank_half(global_batch(step), rank), scale).backward()
        halves.append([p.grad.clone() for p in model.parameters()])
    return halves


def set_ddp_gradients(model, step: int):
    """DDP's gradient in one process: each half-batch gradient halved, then summed."""
    g0, g1 = half_batch_gradients(model, step)
    for p, a, b in zip(model.parameters(), g0, g1):
        p.grad = a / 2 + b / 2


def set_full_batch_gradients(model, step: int):
    model.zero_grad()
    mean_loss(model, *global_batch(step)).backward()


def single_process_run(name: str, steps, set_gradients=set_ddp_gradients, model=None, optimizer=None):
    model = make_model() if model is None else model
    optimizer = OPTIMIZERS[name](model.parameters()) if optimizer is None else optimizer
    for step in steps:
        set_gradients(model, step)
        optimizer.step()
    return model, optimizer


def shards_of(t: torch.Tensor) -> list:
    """FSDP2's split of a tensor over the ranks: torch.chunk on dim 0, a rank past the last chunk
    holding an empty one."""
    chunks = list(t.chunk(WORLD_SIZE))
    return chunks + [t[:0]] * (WORLD_SIZE - len(chunks))


def shardwise_run(name: str):
    """One process stepping each rank's shard of each parameter as a tensor of its own (8-bit state
    where the whole parameter has min_8bit_size elements, as quantlab decides for FSDP2), with DDP's
    gradients. Returns the shards (per parameter, per rank) and the optimizer."""
    model = make_model()
    shards = [[nn.Parameter(s.clone()) for s in shards_of(p.detach())] for p in model.parameters()]
    optimizer = OPTIMIZERS[name]([s for per_rank in shards for s in per_rank])
    for p, per_rank in zip(model.parameters(), shards):
        for shard in per_rank:
            if p.numel() >= optimizer.defaults["min_8bit_size"]:
                qo.set_options(shard, min_8bit_size=0)
            else:
                qo.set_options(shard, state_bits=32)
    for step in range(STEPS):
        with torch.no_grad():
            for p, per_rank in zip(model.parameters(), shards):
                p.copy_(torch.cat(per_rank))
        set_ddp_gradients(model, step)
        for p, per_rank in zip(model.parameters(), shards):
            for shard, grad in zip(per_rank, shards_of(p.grad)):
                shard.grad = grad.clone()
        optimizer.step()
    return shards, optimizer


# --- comparisons --------------------------------------------------------------------------------

def assert_same_state(state, expected, where=""):
    """Same keys; tensors (a quantized state's too) equal bit for bit, with the same dtype and shape;
    the rest equal."""
    assert state.keys() == expected.keys(), where
    for key, value in expected.items():
        if isinstance(value, qo.QuantizedState):
            assert (state[key].code, state[key].block_size) == (value.code, value.block_size), f"{where} {key}"
            assert_same_state({"indices": state[key].indices, "absmax": state[key].absmax},
                              {"indices": value.indices, "absmax": value.absmax}, f"{where} {key}")
        elif torch.is_tensor(value):
            assert value.dtype == state[key].dtype and torch.equal(state[key], value), f"{where} {key}"
        else:
            assert state[key] == value, f"{where} {key}"


def state_bits(state: dict) -> int:
    """8 if a parameter's optimizer state is quantized, else 32."""
    return 8 if any(isinstance(v, qo.QuantizedState) for v in state.values()) else 32


def assert_same_tensors(tensors, expected, where=""):
    assert len(tensors) == len(expected)
    for i, (t, e) in enumerate(zip(tensors, expected)):
        assert t.shape == e.shape and torch.equal(t, e), f"{where} tensor {i}: max |difference| {(t - e).abs().max()}"


def params_of(model):
    return [p.detach() for p in model.parameters()]


def relative_deviation(params, params_ref, start) -> float:
    """||change - reference change|| / ||reference change||, over all parameters together."""
    diff = torch.cat([(p - q).flatten() for p, q in zip(params, params_ref)]).double()
    change = torch.cat([(q - s).flatten() for q, s in zip(params_ref, start)]).double()
    return (diff.norm() / change.norm()).item()


def state_nbytes(state: dict) -> int:
    return sum(v.nbytes for s in state.values() for v in s.values() if isinstance(v, (torch.Tensor, qo.QuantizedState)))


# --- the spawned job ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranks(tmp_path_factory, one_torch_thread):
    """What each rank saved. The single-process checkpoint that ZeRO resumes from is written first."""
    out_dir = tmp_path_factory.mktemp("distributed")
    model, optimizer = single_process_run("adamw8", range(STEPS))
    torch.save({"params": params_of(model), "optimizer": optimizer.state_dict()},
               out_dir / "single_process_checkpoint.pt")
    launch(distributed_job, f"file://{out_dir}/rendezvous", str(out_dir), timeout=JOB_TIMEOUT_S)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


# --- DistributedDataParallel --------------------------------------------------------------------

def test_ddp_gradient_is_the_sum_of_halved_rank_gradients(ranks):
    g0, g1 = half_batch_gradients(make_model(), 0, scale=SUBNORMAL_SCALE)
    halved_then_summed = [a / 2 + b / 2 for a, b in zip(g0, g1)]
    summed_then_halved = [(a + b) / 2 for a, b in zip(g0, g1)]
    # the probe tells the two apart (they agree wherever halving is exact, i.e. on normal floats)
    assert any(not torch.equal(a, b) for a, b in zip(halved_then_summed, summed_then_halved))
    for rank in ranks:
        assert_same_tensors(rank["ddp"]["subnormal_grads"], halved_then_summed, "subnormal")
    model = make_model()
    set_ddp_gradients(model, 0)
    for rank in ranks:
        assert_same_tensors(rank["ddp"]["adamw8"]["first_grads"], [p.grad for p in model.parameters()])


@pytest.mark.parametrize("name", DDP_CASES)
def test_ddp_matches_single_process_bit_for_bit(ranks, name):
    model, optimizer = single_process_run(name, range(STEPS))
    expected_state = optimizer.state_dict()["state"]
    assert {state_bits(s) for s in expected_state.values()} == {8, 32}  # both kinds of state are covered
    for r, rank in enumerate(ranks):
        assert_same_tensors(rank["ddp"][name]["params"], params_of(model), f"rank {r}")
        for i, state in expected_state.items():
            assert_same_state(rank["ddp"][name]["state"][i], state, f"rank {r} parameter {i}")


@pytest.mark.parametrize("name", DDP_CASES)
def test_ddp_agrees_with_full_batch_up_to_summation_order(ranks, name):
    """The full-batch gradient sums the batch in another order (float32 rounding, ~1e-7 relative);
    with 8-bit states such a difference can move a value across a code's decision point (one code
    step, ~1e-2 of the block's absmax) in a few elements. After STEPS steps the parameter change
    agrees within 1e-3 relative (measured 2e-7 for AdamW, 8e-5 for LAMB, 0 for Lion)."""
    start = params_of(make_model())
    model, _ = single_process_run(name, range(STEPS), set_full_batch_gradients)
    assert relative_deviation(ranks[0]["ddp"][name]["params"], params_of(model), start) < 1e-3


# --- ZeroRedundancyOptimizer --------------------------------------------------------------------

def test_zero_shards_the_state_and_matches_single_process(ranks):
    model, optimizer = single_process_run("adamw8", range(STEPS))
    expected_state = optimizer.state_dict()["state"]
    owned = [set(rank["zero"]["owned"]) for rank in ranks]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == set(expected_state)
    for r, rank in enumerate(ranks):
        assert_same_tensors(rank["zero"]["params"], params_of(model), f"rank {r}")
        assert set(rank["zero"]["state"]) == set(range(len(owned[r])))  # the local optimizer's indices
        for local_index, i in enumerate(rank["zero"]["owned"]):
            assert_same_state(rank["zero"]["state"][local_index], expected_state[i], f"rank {r} parameter {i}")
    per_rank = [state_nbytes(rank["zero"]["state"]) for rank in ranks]
    assert sum(per_rank) == state_nbytes(expected_state) and max(per_rank) < state_nbytes(expected_state)


def test_zero_checkpoint_resumes_in_one_process(ranks):
    consolidated = ranks[0]["zero"]["consolidated"]
    _, optimizer = single_process_run("adamw8", range(STEPS))
    for i, state in optimizer.state_dict()["state"].items():
        assert_same_state(consolidated["state"][i], state, f"consolidated parameter {i}")
    model = make_model()
    with torch.no_grad():
        for p, saved in zip(model.parameters(), ranks[0]["zero"]["params"]):
            p.copy_(saved)
    resumed = OPTIMIZERS["adamw8"](model.parameters())
    resumed.load_state_dict(consolidated)
    single_process_run("adamw8", range(STEPS, STEPS + RESUME_STEPS), model=model, optimizer=resumed)
    never_distributed, _ = single_process_run("adamw8", range(STEPS + RESUME_STEPS))
    assert_same_tensors(params_of(model), params_of(never_distributed))


def test_single_process_checkpoint_resumes_on_zero(ranks):
    never_distributed, _ = single_process_run("adamw8", range(STEPS + RESUME_STEPS))
    for r, rank in enumerate(ranks):
        assert_same_tensors(rank["zero"]["resumed_params"], params_of(never_distributed), f"rank {r}")


# --- FSDP2 --------------------------------------------------------------------------------------

def test_fsdp2_32bit_state_matches_unsharded_bit_for_bit(ranks):
    model, optimizer = single_process_run("adamw32", range(STEPS))
    first = make_model()
    set_ddp_gradients(first, 0)
    for r, rank in enumerate(ranks):
        run = rank["fsdp2"]["adamw32"]
        assert_same_tensors(run["first_grads"], [shards_of(p.grad)[r] for p in first.parameters()], f"rank {r}")
        assert_same_tensors(run["params"], [shards_of(p)[r] for p in params_of(model)], f"rank {r}")
        for i, state in optimizer.state_dict()["state"].items():
            expected = {k: shards_of(v)[r] if torch.is_tensor(v) else v for k, v in state.items()}
            assert_same_state(run["state"][i], expected, f"rank {r} parameter {i}")


def test_fsdp2_8bit_blocks_follow_the_shards(ranks):
    shards, optimizer = shardwise_run("adamw8")
    for r, rank in enumerate(ranks):
        run = rank["fsdp2"]["adamw8"]
        assert_same_tensors(run["params"], [per_rank[r].detach() for per_rank in shards], f"rank {r}")
        for i, per_rank in enumerate(shards):
            assert_same_state(run["state"][i], optimizer.state[per_rank[r]], f"rank {r} parameter {i}")
        # the two weights above min_8bit_size keep 8-bit state although each shard is below it
        assert [state_bits(s) for s in run["state"].values()] == [8, 32, 8, 32, 32, 32, 32]
    assert ranks[1]["fsdp2"]["adamw8"]["params"][4].numel() == 0  # PReLU's weight: nothing on rank 1


def test_fsdp2_8bit_close_to_unsharded(ranks):
    """Only the 40x160 weight's shards end mid-block: its blocks, hence its absmax scales, differ
    from the unsharded run's, and the parameters then feed back into every gradient. Measured
    relative deviation of the parameter change after 4 steps: 5.8e-3. The bound, 1e-2, is half the
    deviation of 32-bit states from the unsharded 8-bit run (2.1e-2): it tells other blocks from
    no quantization at all."""
    start = params_of(make_model())
    model, _ = single_process_run("adamw8", range(STEPS))
    sharded = [torch.cat([rank["fsdp2"]["adamw8"]["params"][i] for rank in ranks]) for i in range(len(start))]
    assert relative_deviation(sharded, params_of(model), start) < 1e-2


def test_fsdp2_lars_trust_ratio_uses_whole_tensor_norms(ranks):
    """LARS all-reduces its norms over the shards: only their summation order differs from one
    process (~1e-7 relative per norm). Measured relative deviation of the parameter change 5.7e-7,
    bound 1e-5; with each rank's own norms it is 3.8e-2."""
    start = params_of(make_model())
    model, _ = single_process_run("lars32", range(STEPS))
    sharded = [torch.cat([rank["fsdp2"]["lars32"]["params"][i] for rank in ranks]) for i in range(len(start))]
    assert relative_deviation(sharded, params_of(model), start) < 1e-5


def test_fsdp2_refuses_lamb_and_agrees_on_nonfinite_steps(ranks):
    for rank in ranks:
        assert rank["fsdp2"]["lamb_error"] is not None and "LAMB does not step sharded" in rank["fsdp2"]["lamb_error"]
        # rank 1's shard alone held a NaN: both ranks skipped the step
        assert rank["fsdp2"]["nan_skip"] == {"skipped_steps": 1, "unchanged": True}


# --- the benchmark ------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_distributed_writes_its_rows(tmp_path):
    from experiments.bench.distributed import main

    result = main(["--width", "64", "--batch", "8", "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text())["rows"] == result["rows"]
    rows = {(r["setup"], r["optimizer"]): r for r in result["rows"]}
    assert len(rows) == 6 and all(r["step_ms"] > 0 for r in rows.values())
    for optimizer in ("quantlab AdamW 8-bit", "torch AdamW"):
        whole = rows["1 process", optimizer]["state_bytes_per_rank"]
        assert rows["2 gloo processes, DDP", optimizer]["state_bytes_per_rank"] == whole * 2  # a full copy each
        zero = rows["2 gloo processes, ZeRO", optimizer]["state_bytes_per_rank"]
        assert sum(zero) == whole[0] and max(zero) < whole[0]  # the same states, split
