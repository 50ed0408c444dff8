"""Data-parallel training over torch.distributed processes, launched by torchrun (or any launcher that
sets its environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    torchrun --nproc-per-node 2 -m experiments pretrain --method moco --out runs/moco-2proc

A run is defined by its global batch: `batch_size` images a step whatever the number of processes.
Every rank draws the same epoch order and the same augmentations of the whole global batch (from
(seed, step), as one process does) and keeps its contiguous share of it, so a step sees the same
images and views on any world size. Gradients are averaged by DistributedDataParallel, and what a
method computes over the batch beyond per-sample losses is made global here: the negatives of SimCLR
(`gather_with_grad`), the keys MoCo enqueues, DINO's centre and SwAV's Sinkhorn codes
(`gather_from_ranks`). BatchNorm statistics stay per rank on the CPU (SyncBatchNorm needs a GPU; on
CUDA the engine converts them). On one process every function here is the identity.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launched_distributed() -> bool:
    """Whether a launcher (torchrun) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str) -> bool:
    """Join the process group torchrun describes (gloo on the CPU, nccl on CUDA); on CUDA each process
    takes the GPU of its LOCAL_RANK. Returns whether it joined one (nothing to do for a single process
    or an existing group)."""
    if not launched_distributed() or dist.is_initialized():
        return False
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return True


def batch_share(global_batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch, which must split evenly over the ranks."""
    world = world_size()
    if len(global_batch) % world:
        raise ValueError(f"a global batch of {len(global_batch)} does not split evenly over {world} processes")
    share = len(global_batch) // world
    return global_batch[rank() * share:(rank() + 1) * share]


@torch.no_grad()
def gather_from_ranks(local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local` (of one shape) concatenated along dim 0 in rank order; no gradient."""
    if world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own rows: when every rank
    computes the same loss of the gathered batch, DDP's average of the ranks' gradients is then the
    gradient of that loss. (A sum-all-reduce then a slice: gloo has no reduce-scatter.)"""

    @staticmethod
    def forward(ctx, local):
        ctx.rows = len(local)
        return gather_from_ranks(local)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[rank() * ctx.rows:(rank() + 1) * ctx.rows]


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """gather_from_ranks, differentiable (see _GatherWithGrad)."""
    return local if world_size() == 1 else _GatherWithGrad.apply(local)


def own_rows(gathered: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor gathered by gather_from_ranks."""
    rows = len(gathered) // world_size()
    return gathered[rank() * rows:(rank() + 1) * rows]


def mean_over_ranks(value: float) -> float:
    """The average of a scalar over the ranks (each rank's loss of its share -> the global batch's loss)."""
    if world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / world_size()
