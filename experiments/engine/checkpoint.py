"""Checkpoints of a run: written atomically, refused when damaged or when the run's config changed what
the saved steps computed, and whole under ZeRO (a run saved by N processes resumes on any number)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from experiments import distributed
from experiments.engine.config import RunConfig

# a resumed run may change these: they do not touch the training computation up to the saved step
RESUMABLE_CHANGES = {"epochs", "checkpoint_every", "knn_k", "knn_temperature", "probe_epochs", "eval_subset",
                     "finetune_fractions", "finetune_epochs", "finetune_lr", "shard_optimizer_state"}


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


def remove_stale_temporaries(out_dir: Path) -> None:
    """Half-written checkpoints of a process killed while saving (never loaded: see save_atomically)."""
    for temporary in out_dir.glob(".checkpoint.pt.*.tmp"):
        temporary.unlink(missing_ok=True)


def check_resumable(saved: dict, config: RunConfig, step: int, total_steps: int) -> None:
    current = config.to_dict()
    changed = sorted(k for k in current if current[k] != saved.get(k)) if saved.keys() == current.keys() else ["keys"]
    if set(changed) - RESUMABLE_CHANGES:
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {changed} "
                         f"(only {sorted(RESUMABLE_CHANGES)} may change)")
    if total_steps < step:
        raise ValueError(f"cannot resume: the checkpoint is at step {step}, past this config's {total_steps} steps")


def local_optimizer(optimizer):
    """What steps this rank's parameters: the optimizer, or ZeRO's optimizer of this rank's share."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def whole_optimizer_state(optimizer) -> dict | None:
    """The optimizer's state dict; under ZeRO the ranks' shares consolidated on rank 0 (a collective:
    every rank calls it; None elsewhere)."""
    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.state_dict()
    optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if distributed.rank() == 0 else None
