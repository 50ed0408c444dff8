"""Crash safety: a run killed by SIGKILL while it writes a checkpoint resumes from the last complete
one, loses at most one checkpoint interval, and ends exactly where an uninterrupted run ends. A
checkpoint that is damaged, of another format, or does not fit the run is refused, saying why."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import quantlab
from experiments.engine import checkpoint, run
from experiments.engine.config import load_config

CONFIG = {"method": "simclr", "train_subset": 64, "batch_size": 16, "augment": {"output_size": 14},
          "checkpoint_every": 1, "threads": 1}  # 4 steps, a checkpoint after each

# run in a process of its own: torch.save writes half of the second checkpoint, says so, and hangs
KILLED_RUN = """
import io, sys, time, torch
from experiments.engine import checkpoint, run
from experiments.engine.config import load_config

real_save, saves = torch.save, []

def save_half_then_hang(obj, f):
    saves.append(1)
    if len(saves) < 2:
        return real_save(obj, f)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    open(sys.argv[2], "w").close()
    time.sleep(600)

torch.save = save_half_then_hang
run.pretrain(load_config(__import__("json").loads(sys.argv[3])), sys.argv[1], progress=False)
"""


def model_state(run_dir):
    return checkpoint.load_checkpoint(run_dir)["model"]


def test_sigkill_while_checkpointing_resumes_from_the_last_complete_checkpoint(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(run_dir), str(marker), json.dumps(CONFIG)],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"the run_dir ended before its second checkpoint:\n{child.stderr.read()}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the run_dir never reached its second checkpoint")
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    child.stderr.close()

    torn = list(run_dir.glob(".checkpoint.pt.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0  # killed mid-write: half a file beside the checkpoint
    assert checkpoint.load_checkpoint(run_dir)["step"] == 1  # the last complete checkpoint, untouched
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # step 2 was logged before its checkpoint was cut short

    run.pretrain(load_config(CONFIG), run_dir, resume=True, progress=False)
    assert not list(run_dir.glob(".checkpoint.pt.*.tmp"))
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    uninterrupted = tmp_path / "uninterrupted"
    run.pretrain(load_config(CONFIG), uninterrupted, progress=False)
    resumed, reference = model_state(run_dir), model_state(uninterrupted)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_checkpoint_is_refused_not_loaded(tmp_path, damage):
    run.pretrain(load_config(CONFIG, {"train_subset": 32, "checkpoint_every": 0}), tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    garbage = random.Random(damage).randbytes(len(data))  # seeded: random bytes fail in many ways
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": garbage, "empty": b""}[damage])
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        checkpoint.load_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        run.pretrain(load_config(CONFIG, {"train_subset": 32, "checkpoint_every": 0}), tmp_path, resume=True,
                       progress=False)


def saved_run(tmp_path):
    run.pretrain(load_config(CONFIG, {"train_subset": 32, "checkpoint_every": 0}), tmp_path, progress=False)
    return torch.load(tmp_path / "checkpoint.pt", weights_only=True)


def test_a_checkpoint_of_another_format_is_refused_by_name(tmp_path):
    saved = saved_run(tmp_path)
    assert saved["format"] == checkpoint.CHECKPOINT_FORMAT and saved["quantlab"] == quantlab.__version__
    for edit, message in [(lambda s: s.pop("format"), "records no format"),
                          (lambda s: s.update(format=checkpoint.CHECKPOINT_FORMAT + 1, quantlab="9.9"),
                           r"format 2 \(quantlab 9.9\).*reads format 1 only"),
                          (lambda s: s.pop("optimizer"), "damaged checkpoint.*holds"),
                          (lambda s: s.update(step=-1), "damaged checkpoint: step -1")]:
        damaged = dict(saved)
        edit(damaged)
        torch.save(damaged, tmp_path / "checkpoint.pt")
        with pytest.raises(ValueError, match=message):
            checkpoint.load_checkpoint(tmp_path)
    torch.save(["not", "a", "dict"], tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="records no format"):
        checkpoint.load_checkpoint(tmp_path)


def test_resume_names_each_setting_that_differs():
    config = load_config(CONFIG)
    saved = {**config.to_dict(), "lr": 0.5, "removed_option": 1}
    del saved["weight_decay"]
    with pytest.raises(ValueError) as refused:
        checkpoint.check_resumable(saved, config, 1, 4)
    message = str(refused.value)
    assert f"lr: 0.5 in the checkpoint, {config.lr!r} now" in message
    assert "removed_option: 1 in the checkpoint, '(absent)' now" in message
    assert f"weight_decay: '(absent)' in the checkpoint, {config.weight_decay!r} now" in message
    checkpoint.check_resumable({**config.to_dict(), "epochs": 7}, config, 1, 4)  # epochs may change
    with pytest.raises(ValueError, match="past this config's 4 steps"):
        checkpoint.check_resumable(config.to_dict(), config, 5, 4)


def test_resume_refuses_a_model_or_optimizer_state_that_does_not_fit(tmp_path):
    saved = saved_run(tmp_path)
    config = load_config(CONFIG, {"train_subset": 32, "checkpoint_every": 0})
    other_model = {**saved, "model": {k: v[..., :1] if v.dim() else v for k, v in saved["model"].items()}}
    torch.save(other_model, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint.pt: its model state does not fit"):
        run.pretrain(config, tmp_path, resume=True, progress=False)
    state = saved["optimizer"]["state"]
    index = next(iter(state))
    other_optimizer = {**saved, "optimizer": {**saved["optimizer"], "state": {**state, index: {"step": 1}}}}
    torch.save(other_optimizer, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=f"its optimizer state does not fit.*parameter {index} "):
        run.pretrain(config, tmp_path, resume=True, progress=False)
