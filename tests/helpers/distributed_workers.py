"""What tests/quantlab/optim/test_distributed.py runs in each of its 2 gloo ranks, and what its single-process
references share with them: the model, the global batches, the optimizers.

One spawned job (``distributed_job``) runs every distributed case in one process group, since
starting a process costs seconds (torch and Numba imports). Each rank saves what the parent
compares as ``rank{r}.pt``: plain tensors, ints and tuples, read back with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import quantlab.optim as qo
from experiments.bench.distributed import init_gloo
from quantlab.optim.bridge import is_dtensor

WORLD_SIZE = 2
STEPS = 4  # distributed steps before results are compared
RESUME_STEPS = 2  # steps after a state dict moves between 2 ranks and 1 process
BATCH = 16
SUBNORMAL_SCALE = 2.0 ** -120  # loss scale that makes most gradients subnormal (below 2**-126)

OPTIMIZERS = {
    "adamw8": lambda params, **kw: qo.AdamW(params, lr=1e-2, **kw),
    "adamw32": lambda params, **kw: qo.AdamW(params, lr=1e-2, state_bits=32, **kw),
    "lion8": lambda params, **kw: qo.Lion(params, lr=1e-3, weight_decay=0.1, **kw),
    "lamb8": lambda params, **kw: qo.LAMB(params, lr=1e-2, weight_decay=0.01, **kw),
    "lars32": lambda params, **kw: qo.LARS(params, lr=1.0, weight_decay=1e-4, trust_coefficient=0.01,
                                           state_bits=32, **kw),
}
DDP_CASES = ("adamw8", "lion8", "lamb8")
FSDP2_CASES = ("adamw8", "adamw32", "lars32")


def make_model() -> nn.Sequential:
    """Two weights above min_8bit_size (4096): 160x32 (FSDP2 shards of 2560 elements, whole 256-element
    blocks) and 40x160 (shards of 3200, ending mid-block); small tensors with float32 state; an odd
    output size (shards of 3 and 2 rows) and a one-element PReLU weight (rank 1's shard is empty)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 160), nn.Tanh(), nn.Linear(160, 40), nn.PReLU(), nn.Linear(40, 5))


def global_batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 32, generator=gen), torch.randn(BATCH, 5, generator=gen)


def rank_half(batch, rank: int):
    return tuple(t.chunk(WORLD_SIZE)[rank] for t in batch)


def mean_loss(model, x, y, scale=1.0):
    return nn.functional.mse_loss(model(x), y) * scale


def plain_state(optimizer) -> dict:
    """The optimizer's state by parameter index (tensors, quantized states and ints)."""
    return optimizer.state_dict()["state"]


def train(model, optimizer, rank: int, steps: range):
    """Each rank's half of each global batch, mean loss; returns the gradients of the first step."""
    first_grads = None
    for step in steps:
        optimizer.zero_grad()
        mean_loss(model, *rank_half(global_batch(step), rank)).backward()
        if first_grads is None:
            first_grads = [local(p.grad).clone() for p in model.parameters()]
        optimizer.step()
    return first_grads


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def ddp_runs(rank: int) -> dict:
    results = {}
    for name in DDP_CASES:
        model = make_model()
        optimizer = OPTIMIZERS[name](model.parameters())
        first_grads = train(DistributedDataParallel(model), optimizer, rank, range(STEPS))
        results[name] = {"params": [p.detach().clone() for p in model.parameters()],
                         "state": plain_state(optimizer), "first_grads": first_grads}
    # gradients of a subnormal loss, where halving is inexact: shows whether DDP divides before summing
    model = make_model()
    ddp = DistributedDataParallel(model)  # held: DDP's gradient hooks go with it
    mean_loss(ddp, *rank_half(global_batch(0), rank), scale=SUBNORMAL_SCALE).backward()
    results["subnormal_grads"] = [p.grad.clone() for p in model.parameters()]
    return results


def zero_runs(rank: int, out_dir: Path) -> dict:
    """ZeRO-1 with 8-bit AdamW: STEPS steps, then the consolidated state dict (rank 0); and, from the
    single-process checkpoint the parent wrote, RESUME_STEPS more steps on 2 ranks."""
    model = make_model()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=qo.AdamW, lr=1e-2)
    train(DistributedDataParallel(model), zero, rank, range(STEPS))
    index = {p: i for i, p in enumerate(model.parameters())}
    result = {"params": [p.detach().clone() for p in model.parameters()],
              # the global index of each parameter of this rank's optimizer, in its order
              "owned": [index[p] for group in zero.optim.param_groups for p in group["params"]],
              "state": plain_state(zero.optim)}
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        result["consolidated"] = zero.state_dict()

    checkpoint = torch.load(out_dir / "single_process_checkpoint.pt")
    model = make_model()
    with torch.no_grad():
        for p, saved in zip(model.parameters(), checkpoint["params"]):
            p.copy_(saved)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=qo.AdamW, lr=1e-2)
    zero.load_state_dict(checkpoint["optimizer"])
    train(DistributedDataParallel(model), zero, rank, range(STEPS, STEPS + RESUME_STEPS))
    result["resumed_params"] = [p.detach().clone() for p in model.parameters()]
    return result


def fully_sharded_model() -> nn.Sequential:
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def fsdp2_runs(rank: int) -> dict:
    results = {}
    for name in FSDP2_CASES:
        model = fully_sharded_model()
        optimizer = OPTIMIZERS[name](model.parameters())
        first_grads = train(model, optimizer, rank, range(STEPS))
        results[name] = {"params": [p.to_local().detach().clone() for p in model.parameters()],
                         "state": plain_state(optimizer), "first_grads": first_grads}

    model = fully_sharded_model()
    lamb = OPTIMIZERS["lamb8"](model.parameters())
    mean_loss(model, *rank_half(global_batch(0), rank)).backward()
    try:
        lamb.step()
        results["lamb_error"] = None
    except ValueError as error:
        results["lamb_error"] = str(error)

    # a NaN in rank 1's shard only: both ranks must skip the step
    model = fully_sharded_model()
    optimizer = OPTIMIZERS["adamw8"](model.parameters(), skip_nonfinite=True)
    before = [p.to_local().detach().clone() for p in model.parameters()]
    mean_loss(model, *rank_half(global_batch(0), rank)).backward()
    if rank == 1:
        model[0].weight.grad.to_local()[0, 0] = float("nan")
    optimizer.step()
    results["nan_skip"] = {"skipped_steps": optimizer.skipped_steps,
                           "unchanged": all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))}
    return results


def distributed_job(rank: int, init_method: str, out_dir: str) -> None:
    init_gloo(rank, init_method, WORLD_SIZE)
    try:
        out_dir = Path(out_dir)
        results = {"ddp": ddp_runs(rank), "zero": zero_runs(rank, out_dir), "fsdp2": fsdp2_runs(rank)}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
