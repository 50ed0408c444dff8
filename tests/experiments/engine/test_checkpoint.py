"""Crash safety: a run killed by SIGKILL while it writes a checkpoint resumes from the last complete
one, loses at most one checkpoint interval, and ends exactly where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

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
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        checkpoint.load_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        run.pretrain(load_config(CONFIG, {"train_subset": 32, "checkpoint_every": 0}), tmp_path, resume=True,
                       progress=False)
