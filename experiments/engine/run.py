"""Pretraining runs: a run directory trained one epoch at a time (engine/loop.py), checkpointed, summarised.

A run directory holds:
    config.json      the RunConfig
    versions.json    what produced it (quantlab.provenance.environment), with the world size
    metrics.jsonl    one line a step: step, epoch, loss, lr, and seconds spent in data + augmentation,
                     forward + backward, and the optimizer step
    checkpoint.pt    method and optimizer state, step, config and the metrics so far; written
                     atomically every `checkpoint_every` steps and at the end (engine/checkpoint.py)
    metrics.csv, summary.json   at the end (summary: losses, time split, optimizer state bytes)
    eval.json        from engine.evaluate.evaluate_run

Resuming on the CPU is bit-identical to not stopping (see engine/loop.py). Under torchrun (see
experiments/distributed.py) every rank trains on its share of each global batch inside
DistributedDataParallel; rank 0 alone writes the run directory. A checkpoint holds the whole model and
optimizer state, so a run saved by N processes resumes on any number of them.
"""
from __future__ import annotations

import contextlib
import csv
import json
import resource
import statistics
import time
from pathlib import Path

import numba
import torch
from torch.nn.parallel import DistributedDataParallel

import quantlab.optim
from experiments import distributed
from experiments.data import ImageDataset, load_dataset
from experiments.engine.checkpoint import (
    check_resumable,
    checkpoint_record,
    load_checkpoint,
    local_optimizer,
    remove_stale_temporaries,
    restore,
    save_atomically,
    whole_optimizer_state,
)
from experiments.engine.config import RunConfig
from experiments.engine.loop import train_one_epoch
from experiments.engine.optimizer import make_optimizer
from experiments.engine.progress import Progress
from experiments.methods import make_method
from experiments.models import make_backbone
from quantlab.provenance import environment

PHASES = ("data_s", "model_s", "optimizer_s")  # data + augmentation, forward + backward, optimizer step


def fixed_subset(dataset: ImageDataset, n: int | None) -> ImageDataset:
    """The first n images of a permutation that depends on nothing (not the run's seed), so runs
    with different seeds see the same images."""
    if n is None:
        return dataset
    if n > len(dataset):
        raise ValueError(f"asked for {n} images of {dataset.name}, which has {len(dataset)}")
    return dataset.subset(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n])


def build_method(config: RunConfig):
    """The method with a freshly initialised backbone; torch's generator seeded for the initial weights."""
    torch.manual_seed(config.seed)
    backbone, feature_dim = make_backbone(config.backbone)
    return make_method(config.method, backbone, feature_dim, **config.method_options).to(config.device)


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads and Numba's (quantlab's optimizer kernels) both, when the config sets them."""
    if threads is not None:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def parallel(method, config: RunConfig):
    """The method in DistributedDataParallel over the ranks of a torchrun launch; itself on one process."""
    if distributed.world_size() == 1:
        return method
    if config.device == "cuda":
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    return DistributedDataParallel(method, find_unused_parameters=method.may_leave_parameters_unused)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's states: under ZeRO, this rank's share."""
    return quantlab.optim.state_bytes(local_optimizer(optimizer))


def summarize(metrics: list[dict], optimizer, method, elapsed_s: float) -> dict:
    """Final losses, where the step time went, and the optimizer state's size."""
    totals = {phase: sum(m[phase] for m in metrics) for phase in PHASES}
    step_total = sum(totals.values())
    parameters = sum(p.numel() for p in method.trainable_parameters())
    state_bytes = optimizer_state_bytes(optimizer)
    # 8-bit optimizers keep float32 states for tensors under min_8bit_size elements
    local = local_optimizer(optimizer)
    local_parameters = sum(p.numel() for group in local.param_groups for p in group["params"])
    in_8bit = sum(p.numel() for p, state in local.state.items()
                  if any(t.dtype == torch.uint8 for t in quantlab.optim.state.state_tensors(state)))
    return {
        "steps": len(metrics),
        "last_loss": metrics[-1]["loss"],
        "mean_loss_last_10": statistics.fmean(m["loss"] for m in metrics[-10:]),
        "elapsed_s": elapsed_s,
        "trainable_parameters": parameters,
        "optimizer_state_bytes": state_bytes,
        "optimizer_state_bytes_per_parameter": state_bytes / parameters,
        "fraction_of_parameters_with_8bit_state": in_8bit / local_parameters,
        "time_split": {phase: {"median_ms": 1e3 * statistics.median(m[phase] for m in metrics),
                               "total_s": totals[phase], "fraction": totals[phase] / step_total} for phase in PHASES},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # the whole process's peak
    }


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_csv(path: Path, records: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def pretrain(config: RunConfig, out_dir, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Train config.method for config.epochs in out_dir; returns the summary (also summary.json).

    resume=True continues from out_dir/checkpoint.pt; without it an existing checkpoint is an error
    unless overwrite=True. Under torchrun, joins the launch's process group for the run.
    """
    joined = distributed.init_from_environment(config.device)
    try:
        return train_run(config, Path(out_dir), resume, progress, overwrite)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def train_run(config: RunConfig, out_dir: Path, resume: bool, progress: bool, overwrite: bool) -> dict:
    started = time.perf_counter()
    writes = distributed.rank() == 0  # rank 0 alone writes the run directory
    world = distributed.world_size()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} (the global batch) does not split over {world} processes")
    use_threads(config.threads)
    images = fixed_subset(load_dataset(config.dataset, "train", root=config.data_root), config.train_subset).images
    steps_per_epoch = len(images) // config.batch_size  # drop_last: every step sees a full batch
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {len(images)} training images")
    total_steps = config.epochs * steps_per_epoch

    method = build_method(config)
    optimizer = make_optimizer(config, method.trainable_parameters())
    metrics, step, elapsed_before = [], 0, 0.0
    if resume:
        checkpoint = load_checkpoint(out_dir)
        check_resumable(checkpoint["config"], config, checkpoint["step"], total_steps)
        restore(checkpoint, method, optimizer, out_dir)
        metrics, step, elapsed_before = checkpoint["metrics"], checkpoint["step"], checkpoint["elapsed_s"]
    elif (out_dir / "checkpoint.pt").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a run: resume it, or choose another directory")
    model = parallel(method, config)  # after loading: DDP starts every rank from rank 0's weights
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        config.save(out_dir / "config.json")
        (out_dir / "versions.json").write_text(json.dumps({**environment(), "world_size": world}, indent=2) + "\n")
        write_jsonl(out_dir / "metrics.jsonl", metrics)  # on resume: cut back to the checkpoint's step

    def save_checkpoint():
        optimizer_state = whole_optimizer_state(optimizer)  # on every rank: a collective under ZeRO
        if writes:
            save_atomically(checkpoint_record(
                model=method.state_dict(), optimizer=optimizer_state, step=step, epoch=step // steps_per_epoch,
                config=config.to_dict(), metrics=metrics, elapsed_s=elapsed_before + time.perf_counter() - started,
                world_size=world), out_dir / "checkpoint.pt")

    bar = Progress(total_steps, step, progress and writes)
    with open(out_dir / "metrics.jsonl", "a") if writes else contextlib.nullcontext() as log:
        def after_step(record):
            nonlocal step
            step = record["step"]
            metrics.append(record)
            if writes:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(record)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                save_checkpoint()

        for epoch in range(step // steps_per_epoch, config.epochs):
            step = train_one_epoch(model, optimizer, images, config, epoch, step, total_steps, after_step)
    save_checkpoint()
    summary = {**summarize(metrics, optimizer, method, elapsed_before + time.perf_counter() - started),
               "world_size": world}
    if writes:
        write_csv(out_dir / "metrics.csv", metrics)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
