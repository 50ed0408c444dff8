"""Pretrain a self-supervised method one epoch at a time (the engine of facebookresearch/mae's
main_pretrain), and evaluate the backbone it leaves.

A run directory holds:
    config.json      the RunConfig
    versions.json    library versions, platform, CPU count, git commit
    metrics.jsonl    one line a step: step, epoch, loss, lr, and seconds spent in data + augmentation,
                     forward + backward, and the optimizer step
    checkpoint.pt    method and optimizer state, step, config and the metrics so far; written
                     atomically every `checkpoint_every` steps and at the end
    metrics.csv, summary.json   at the end (summary: losses, time split, optimizer state bytes)
    eval.json        from evaluate_run

Resuming on the CPU is bit-identical to not stopping: an epoch's data order comes from a generator
seeded with (seed, epoch), and each step seeds both its augmentation generator and torch's global
generator from (seed, step), so no random state crosses a step boundary outside the checkpoint.

Under torchrun (see experiments/distributed.py) every rank trains on its share of each global batch
inside DistributedDataParallel; rank 0 alone writes the run directory. A checkpoint holds the whole
model and optimizer state, so a run saved by N processes resumes on any number of them.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.metadata
import json
import math
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numba
import torch
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import quantlab.optim

from experiments import distributed

from experiments.augment import augment
from experiments.backbones import VisionTransformer, make_backbone
from experiments.config import RunConfig, make_optimizer
from experiments.data import ImageDataset, load_dataset, to_float
from experiments.evaluate import extract_features, fine_tune, knn_accuracy, linear_probe
from experiments.methods import make_method
from experiments.multilabel import fine_tune_multilabel, linear_probe_multilabel

PHASES = ("data_s", "model_s", "optimizer_s")  # data + augmentation, forward + backward, optimizer step
# a resumed run may change these: they do not touch the training computation up to the saved step
RESUMABLE_CHANGES = {"epochs", "checkpoint_every", "knn_k", "knn_temperature", "probe_epochs", "eval_subset",
                     "finetune_fractions", "finetune_epochs", "finetune_lr", "shard_optimizer_state"}


def derived_seed(*parts) -> int:
    """A 63-bit seed for one use (an epoch's order, a step's augmentation) of the run's seed."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


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


def cosine_learning_rate(step: int, total_steps: int, steps_per_epoch: int, config: RunConfig) -> float:
    """Linear warm-up, then half a cosine to 0 (Loshchilov & Hutter 2017, as MoCo v2 uses)."""
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return config.lr * step / warmup
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads and Numba's (quantlab's optimizer kernels) both, when the config sets them."""
    if threads is not None:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def parallel(method, config: RunConfig):
    """The method in DistributedDataParallel over the ranks of a torchrun launch; itself on one process."""
    if distributed.world_size() == 1:
        return method
    if config.device == "cuda":
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    return DistributedDataParallel(method, find_unused_parameters=method.may_leave_parameters_unused)


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

        lr = cosine_learning_rate(step, total_steps, steps_per_epoch, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
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


class Progress:
    """step/total, loss, steps/s and ETA on stderr: one updating line on a terminal, else a line every 10 s."""

    def __init__(self, total_steps: int, first_step: int, enabled: bool):
        self.total, self.first, self.enabled = total_steps, first_step, enabled
        self.start = self.last_line = time.perf_counter()
        self.terminal = sys.stderr.isatty()

    def update(self, record: dict) -> None:
        now = time.perf_counter()
        done = record["step"] == self.total
        if not self.enabled or not (self.terminal or done or now - self.last_line >= 10):
            return
        self.last_line = now
        rate = (record["step"] - self.first) / max(now - self.start, 1e-9)
        eta = (self.total - record["step"]) / max(rate, 1e-9)
        line = (f"step {record['step']}/{self.total} | epoch {record['epoch'] + 1} | loss {record['loss']:.4f} | "
                f"{rate:.2f} steps/s | ETA {eta // 60:.0f}m{eta % 60:02.0f}s")
        print(("\r" if self.terminal else "") + line, end="\n" if done or not self.terminal else "",
              file=sys.stderr, flush=True)


def save_atomically(obj, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`: a crash
    leaves the old checkpoint or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


def load_checkpoint(run_dir) -> dict:
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint.pt in {run_dir}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        # save_atomically never leaves one: the file was damaged or cut short after it was written
        raise RuntimeError(f"{path} is not a complete checkpoint ({error}); nothing was loaded") from error


def local_optimizer(optimizer):
    """What steps this rank's parameters: the optimizer, or ZeRO's optimizer of this rank's share."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def whole_optimizer_state(optimizer) -> dict | None:
    """The optimizer's state dict; under ZeRO the ranks' shares consolidated on rank 0 (a collective:
    every rank calls it; None elsewhere), quantlab's codes as plain data for weights-only loading."""
    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.state_dict()
    optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if distributed.rank() == 0 else None


def check_resumable(saved: dict, config: RunConfig, step: int, total_steps: int) -> None:
    current = config.to_dict()
    changed = sorted(k for k in current if current[k] != saved.get(k)) if saved.keys() == current.keys() else ["keys"]
    if set(changed) - RESUMABLE_CHANGES:
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {changed} "
                         f"(only {sorted(RESUMABLE_CHANGES)} may change)")
    if total_steps < step:
        raise ValueError(f"cannot resume: the checkpoint is at step {step}, past this config's {total_steps} steps")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's states: under ZeRO, this rank's share."""
    return quantlab.optim.state_bytes(local_optimizer(optimizer))


def versions() -> dict:
    """What produced a run: library versions, platform, CPU count, git commit."""
    import quantlab

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "quantlab": quantlab.__version__}
    for package in ("torch", "torchvision", "numpy", "numba", "bitsandbytes"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


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


def remove_stale_temporaries(out_dir: Path) -> None:
    """Half-written checkpoints of a process killed while saving (never loaded: see save_atomically)."""
    for temporary in out_dir.glob(".checkpoint.pt.*.tmp"):
        temporary.unlink(missing_ok=True)


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
        method.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        metrics, step, elapsed_before = checkpoint["metrics"], checkpoint["step"], checkpoint["elapsed_s"]
    elif (out_dir / "checkpoint.pt").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a run: resume it, or choose another directory")
    model = parallel(method, config)  # after loading: DDP starts every rank from rank 0's weights
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        config.save(out_dir / "config.json")
        (out_dir / "versions.json").write_text(json.dumps({**versions(), "world_size": world}, indent=2) + "\n")
        write_jsonl(out_dir / "metrics.jsonl", metrics)  # on resume: cut back to the checkpoint's step

    def save_checkpoint():
        optimizer_state = whole_optimizer_state(optimizer)  # on every rank: a collective under ZeRO
        if writes:
            save_atomically({"model": method.state_dict(), "optimizer": optimizer_state, "step": step,
                             "epoch": step // steps_per_epoch, "config": config.to_dict(), "metrics": metrics,
                             "elapsed_s": elapsed_before + time.perf_counter() - started, "world_size": world},
                            out_dir / "checkpoint.pt")

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


def load_run_config(run_dir) -> RunConfig:
    return RunConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))


def evaluate_backbone(backbone, config: RunConfig, finetune: bool = False, dataset: str | None = None) -> dict:
    """How good the frozen backbone's features are on `dataset` (default: config.dataset, which it was
    trained on). Single-label: k-NN and linear-probe test accuracy, and fine-tuning accuracy at each of
    config.finetune_fractions of the labels when asked. Multi-label (the medical-MAE protocol): mean
    AUC over labels of a linear probe, and of fine-tuning with layer-wise LR decay, DropPath and
    RandAugment when asked."""
    use_threads(config.threads)
    dataset = dataset or config.dataset
    root = config.data_root if dataset == config.dataset else None
    train, test = (load_dataset(dataset, split, root=root) for split in ("train", "test"))
    if config.eval_subset is not None:
        train, test = (fixed_subset(split, min(config.eval_subset, len(split))) for split in (train, test))
    started = time.perf_counter()
    train_features, test_features = extract_features(backbone, train.images), extract_features(backbone, test.images)
    result = {"dataset": dataset, "train_images": len(train), "test_images": len(test)}
    if train.multilabel:
        probe = linear_probe_multilabel(train_features, train.labels, test_features, test.labels,
                                        epochs=config.probe_epochs, seed=config.seed)
        result.update(linear_mean_auc=probe["mean_auc"], linear_per_label_auc=probe["per_label_auc"])
        if finetune:
            # the paper's ViT recipe; a CNN has no layers to decay or blocks to drop
            recipe = {} if isinstance(backbone, VisionTransformer) else {"layer_decay": 1.0, "drop_path": 0.0}
            tuned = fine_tune_multilabel(backbone, train.images, train.labels, test.images, test.labels,
                                         config.finetune_epochs, config.finetune_lr, config.seed,
                                         warmup_epochs=min(1.0, config.finetune_epochs), **recipe)
            result.update(finetune_mean_auc=tuned["mean_auc"], finetune_per_label_auc=tuned["per_label_auc"])
    else:
        result["knn_accuracy"] = knn_accuracy(train_features, train.labels, test_features, test.labels,
                                              k=config.knn_k, temperature=config.knn_temperature)
        result["linear_accuracy"] = linear_probe(train_features, train.labels, test_features, test.labels,
                                                 epochs=config.probe_epochs, seed=config.seed)
        if finetune:
            result["finetune_accuracy"] = {
                str(fraction): fine_tune(backbone, train, test, fraction, config.finetune_epochs, config.finetune_lr,
                                         config.seed) for fraction in config.finetune_fractions}
    result["eval_s"] = time.perf_counter() - started
    return result


def eval_file(run_dir: Path, dataset: str | None = None) -> Path:
    """eval.json for the run's own dataset, eval-DATASET.json for another."""
    own = dataset is None or dataset == load_run_config(run_dir).dataset
    return run_dir / ("eval.json" if own else f"eval-{dataset}.json")


def evaluate_run(run_dir, finetune: bool = False, dataset: str | None = None) -> dict:
    """evaluate_backbone on the run's final checkpoint; saves eval_file(run_dir, dataset)."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    checkpoint = load_checkpoint(run_dir)
    method = build_method(config)
    method.load_state_dict(checkpoint["model"])
    result = {"step": checkpoint["step"], **evaluate_backbone(method.backbone, config, finetune, dataset)}
    eval_file(run_dir, dataset).write_text(json.dumps(result, indent=2) + "\n")
    return result
