"""One epoch of pretraining (the engine of facebookresearch/mae's engine_pretrain: train_one_epoch only).

Every step's randomness is derived from (seed, step): an epoch's data order comes from a generator seeded
with (seed, epoch), and each step seeds its augmentation generator and torch's global generator from
(seed, step), so no random state crosses a step boundary outside a checkpoint and a resumed run is
bit-identical to one never stopped.
"""
from __future__ import annotations

import hashlib
import math
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from experiments import distributed
from experiments.data import to_float
from experiments.data.augment import augment
from experiments.engine.config import RunConfig
from experiments.lr_schedule import set_learning_rate, warmup_cosine


def derived_seed(*parts) -> int:
    """A 63-bit seed for one use (an epoch's order, a step's augmentation) of the run's seed."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def train_one_epoch(model, optimizer, images: torch.Tensor, config: RunConfig, epoch: int, step: int,
                    total_steps: int, after_step) -> int:
    """Steps of one epoch from global `step` to the epoch's end; calls after_step(record) after each.
    Returns the global step reached. `model` is the method, or the method inside DistributedDataParallel."""
    method = unwrap(model)
    steps_per_epoch = len(images) // config.batch_size
    epoch_generator = torch.Generator().manual_seed(derived_seed(config.seed, "epoch", epoch))
    order = torch.randperm(len(images), generator=epoch_generator)
    view_configs = method.view_configs(config.augment_config())
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps)
    method.train()
    for i in range(step - epoch * steps_per_epoch, steps_per_epoch):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(derived_seed(config.seed, "augment", step))
        # dropout, drop-path, masking, anything else: rank 0 draws what a single process draws
        rank = distributed.rank()
        torch.manual_seed(derived_seed(config.seed, "step", step, *([rank] if rank else [])))
        batch = to_float(images[order[i * config.batch_size:(i + 1) * config.batch_size]]).to(config.device)
        # each rank augments the whole global batch and keeps its share: the same views on any world size
        views = [distributed.batch_share(augment(batch, view_config, generator)) for view_config in view_configs]
        synchronize(config.device)
        data_done = time.perf_counter()

        lr = set_learning_rate(optimizer, config.lr, warmup_cosine(step, warmup_steps, total_steps))
        loss = model(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        synchronize(config.device)
        model_done = time.perf_counter()

        optimizer.step()
        synchronize(config.device)
        optimizer_done = time.perf_counter()

        method.on_step_end(step, total_steps)
        loss = distributed.mean_over_ranks(loss.item())  # the global batch's loss, the same on every rank
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step} (epoch {epoch})")
        step += 1
        after_step({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "data_s": data_done - start,
                    "model_s": model_done - data_done, "optimizer_s": optimizer_done - model_done})
    return step
