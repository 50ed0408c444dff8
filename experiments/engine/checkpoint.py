"""Checkpoints of a run: written atomically, refused when damaged, of another format, or when the run's
config changed what the saved steps computed, and whole under ZeRO (a run saved by N processes resumes
on any number)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

import quantlab
from experiments import distributed

# The layout of checkpoint.pt: raise it when a key or the form of a saved state changes, so that an
# older checkpoint is refused by name rather than half-loaded. 1: states as quantlab.optim.QuantizedState.
CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = {"format", "quantlab", "model", "optimizer", "step", "epoch", "config", "metrics", "elapsed_s",
                   "world_size"}

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


def checkpoint_record(**fields) -> dict:
    """What checkpoint.pt holds: ``fields`` (CHECKPOINT_KEYS but the first two) stamped with the format
    and the quantlab version that wrote them."""
    record = {"format": CHECKPOINT_FORMAT, "quantlab": quantlab.__version__, **fields}
    if set(record) != CHECKPOINT_KEYS:
        raise ValueError(f"a checkpoint holds {sorted(CHECKPOINT_KEYS)}, got {sorted(record)}")
    return record


def load_checkpoint(run_dir) -> dict:
    """The run's checkpoint.pt, refused (nothing loaded) when damaged or not of CHECKPOINT_FORMAT."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint.pt in {run_dir}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - random bytes raise anything from the unpickler (IndexError too)
        # save_atomically never leaves one: the file was damaged or cut short after it was written
        raise RuntimeError(f"{path} is not a complete checkpoint ({error}); nothing was loaded") from error
    if not isinstance(saved, dict) or "format" not in saved:
        raise ValueError(f"{path} is not a quantlab checkpoint of format {CHECKPOINT_FORMAT}: it records no "
                         f"format (written by a quantlab before checkpoints had one, or by another program)")
    if saved["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is a checkpoint of format {saved['format']!r} (quantlab "
                         f"{saved.get('quantlab', '?')}); this quantlab ({quantlab.__version__}) reads format "
                         f"{CHECKPOINT_FORMAT} only")
    if set(saved) != CHECKPOINT_KEYS:
        raise ValueError(f"{path} is a damaged checkpoint: it holds {sorted(saved, key=str)}, not "
                         f"{sorted(CHECKPOINT_KEYS)}")
    step = saved["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(saved["config"], dict):
        raise ValueError(f"{path} is a damaged checkpoint: step {step!r}, config of type "
                         f"{type(saved['config']).__name__}")
    return saved


def remove_stale_temporaries(out_dir: Path) -> None:
    """Half-written checkpoints of a process killed while saving (never loaded: see save_atomically)."""
    for temporary in out_dir.glob(".checkpoint.pt.*.tmp"):
        temporary.unlink(missing_ok=True)


def check_resumable(saved: dict, config, step: int, total_steps: int, resumable=RESUMABLE_CHANGES) -> None:
    """Raises unless a run of ``config`` (a RunConfig, or another config with to_dict) may continue from
    a checkpoint of config ``saved`` at ``step``, saying which settings differ; only the keys in
    ``resumable`` may."""
    current, absent = config.to_dict(), "(absent)"
    changed = [f"{k}: {saved.get(k, absent)!r} in the checkpoint, {current.get(k, absent)!r} now"
               for k in sorted(set(current) | set(saved), key=str)
               if k not in resumable and saved.get(k, absent) != current.get(k, absent)]
    if changed:
        raise ValueError("cannot resume: the config differs from the checkpoint's in " + "; ".join(changed)
                         + f" (only {sorted(resumable)} may change)")
    if total_steps < step:
        raise ValueError(f"cannot resume: the checkpoint is at step {step}, past this config's {total_steps} steps")


def restore(checkpoint: dict, method, optimizer, run_dir) -> None:
    """The checkpoint's model and optimizer states loaded into ``method`` and ``optimizer``; a state
    that does not fit them (another model, optimizer or parameter layout) is refused, naming which."""
    for what, target in (("model", method), ("optimizer", optimizer)):
        try:
            target.load_state_dict(checkpoint[what])
            if what == "optimizer" and isinstance(optimizer, ZeroRedundancyOptimizer):
                # ZeRO writes this rank's states into the local optimizer's dict directly: have the
                # local optimizer check them (and take checked copies) as its own load_state_dict does
                optimizer.optim.load_state_dict(optimizer.optim.state_dict())
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as error:
            raise ValueError(f"cannot resume from {Path(run_dir) / 'checkpoint.pt'}: its {what} state does not "
                             f"fit this run's {what}: {error}") from error


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
