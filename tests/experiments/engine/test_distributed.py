"""The engine under torchrun on the CPU (gloo, 2 processes on localhost): a 2-process run computes what
one process computes on the same global batch, and checkpoints move between world sizes.

Exactness: the ranks' gradients are averaged by an all-reduce, so they differ from one process's
in the last bits (another summation order); AdamW's normalised update turns that into differences
of up to ~lr on weights whose gradients are tiny, and the losses then agree to ~1e-6 relative
(measured: about 5e-8 over these steps). Hence rtol 1e-5 on losses; everything that is not
summation order (same images, same views, the MoCo queue gathered from both ranks) must match.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from experiments import distributed
from experiments.bench.distributed import launch
from experiments.engine import checkpoint, run
from experiments.engine.config import load_config
from experiments.methods.simclr import nt_xent_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# MoCo on the ViT: no BatchNorm (whose statistics stay per rank on the CPU) and no randomness inside
# forward, so nothing but summation order separates 1 from 2 processes. 2 steps an epoch.
CONFIG = {"method": "moco", "backbone": "vit-tiny", "batch_size": 16, "threads": 1, "train_subset": 32,
          "method_options": {"queue_size": 64}, "checkpoint_every": 0}


def torchrun_pretrain(config_file, out, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "experiments", "pretrain", "--config", str(config_file), "--quiet", "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_and_checkpoints_move_between_world_sizes(tmp_path):
    """Each run trains epoch 1 on some world size, then resumes for epoch 2 (--epochs 2) on some world
    size: 1 then 1 (the reference), 2 with the optimizer state sharded (ZeRO) then 1, and 1 then 2."""
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(CONFIG))
    one_epoch, two_epochs = load_config(CONFIG), load_config(CONFIG, {"epochs": 2})
    run.pretrain(one_epoch, tmp_path / "one", progress=False)
    shutil.copytree(tmp_path / "one", tmp_path / "one-then-two")
    run.pretrain(two_epochs, tmp_path / "one", resume=True, progress=False)
    torchrun_pretrain(config_file, tmp_path / "two-then-one", "--set", "shard_optimizer_state=true")
    saved = checkpoint.load_checkpoint(tmp_path / "two-then-one")
    assert saved["world_size"] == 2 and saved["step"] == 2
    sharded = json.loads((tmp_path / "two-then-one" / "summary.json").read_text())
    whole = json.loads((tmp_path / "one" / "summary.json").read_text())
    # rank 0 kept the state of about half the tensors; the checkpoint holds all of them
    assert 0.2 < sharded["optimizer_state_bytes"] / whole["optimizer_state_bytes"] < 0.8
    whole_state = checkpoint.load_checkpoint(tmp_path / "one")["optimizer"]["state"]
    assert saved["optimizer"]["state"].keys() == whole_state.keys()
    run.pretrain(two_epochs, tmp_path / "two-then-one", resume=True, progress=False)
    torchrun_pretrain(config_file, tmp_path / "one-then-two", "--epochs", "2", "--resume")

    reference = losses(tmp_path / "one")
    assert len(reference) == 4 and len(set(reference)) == 4
    assert losses(tmp_path / "two-then-one") == pytest.approx(reference, rel=1e-5)
    assert losses(tmp_path / "one-then-two") == pytest.approx(reference, rel=1e-5)
    summary = json.loads((tmp_path / "one-then-two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4


def simclr_gradient_worker(rank, init_file, features, weight, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        weight = weight.clone().requires_grad_()
        first, second = (distributed.batch_share(view) for view in features)
        z1, z2 = first @ weight, second @ weight
        loss = nt_xent_loss(distributed.gather_with_grad(z1), distributed.gather_with_grad(z2), 0.5)
        loss.backward()
        grad = weight.grad.clone()
        dist.all_reduce(grad)  # what DistributedDataParallel does: the average of the ranks' gradients
        torch.save({"loss": loss.detach(), "grad": grad / 2,
                    "gathered": distributed.gather_from_ranks(torch.full((2,), float(rank)))}, out / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_negatives_give_the_global_batch_gradient(tmp_path):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 5, generator=generator, dtype=torch.float64)  # 2 views of 8 samples
    weight = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    launch(simclr_gradient_worker, tmp_path / "init", features, weight, tmp_path, timeout=120)

    single = weight.clone().requires_grad_()
    loss = nt_xent_loss(features[0] @ single, features[1] @ single, 0.5)
    loss.backward()
    for rank in (0, 1):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert torch.equal(result["gathered"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
        assert result["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
        torch.testing.assert_close(result["grad"], single.grad, rtol=1e-12, atol=1e-14)
    # without the gather each rank would see only its own 4 samples as negatives: a different loss
    assert nt_xent_loss(features[0][:4] @ weight, features[1][:4] @ weight, 0.5).item() != pytest.approx(loss.item())


def test_one_process_is_the_identity():
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert torch.equal(distributed.batch_share(x), x) and distributed.gather_from_ranks(x) is x
    assert distributed.gather_with_grad(x) is x and torch.equal(distributed.own_rows(x), x)
    assert distributed.mean_over_ranks(2.5) == 2.5
