"""The pretraining engine at toy sizes: every method with every optimizer, bit-identical resume,
atomic checkpoints, and the optimizer a config names."""
import importlib.util
import json
import math

import pytest
import torch

from experiments.engine import checkpoint, evaluate, loop, progress, run
from experiments.engine.config import load_config
from experiments.engine.optimizer import make_optimizer
from quantlab.optim import QuantizedState

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
# 32 images, batches of 16, 14x14 views: two steps an epoch of about 0.1 s. One thread: at these sizes a
# second one saves nothing, and it stalls every parallel region when other processes share the cores.
TINY = {"train_subset": 32, "batch_size": 16, "augment": {"output_size": 14}, "checkpoint_every": 0, "threads": 1}
OPTIMIZERS = [pytest.param({"optimizer": "torch-adamw"}, id="torch-adamw"),
              pytest.param({"optimizer": "quantlab-adamw", "state_bits": 8}, id="quantlab-adamw-8bit"),
              pytest.param({"optimizer": "quantlab-adamw", "state_bits": 32}, id="quantlab-adamw-32bit"),
              pytest.param({"optimizer": "bnb-adamw8bit"}, id="bnb-adamw8bit",
                           marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed"))]


def tiny_config(**changes):
    method_options = {"queue_size": 32} if changes.get("method", "moco") == "moco" else {}
    return load_config(TINY, {"method_options": method_options}, changes)


@pytest.mark.parametrize("options", OPTIMIZERS)
@pytest.mark.parametrize("method", ["moco", "simclr"])
def test_every_method_trains_with_every_optimizer(tmp_path, method, options):
    config = tiny_config(method=method, **options)
    summary = run.pretrain(config, tmp_path, progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    for name in ("config.json", "versions.json", "metrics.csv", "summary.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0
    assert summary["steps"] == 2 and summary["optimizer_state_bytes"] > 0
    assert set(summary["time_split"]) == {"data_s", "model_s", "optimizer_s"}


def test_eight_bit_state_is_a_quarter_of_float32_plus_small_tensors():
    params = [torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(100))]
    for p in params:
        p.grad = torch.randn_like(p)
    sizes = {}
    for options in ({"optimizer": "torch-adamw"}, {"optimizer": "quantlab-adamw"}):
        optimizer = make_optimizer(load_config(options), params)
        optimizer.step()
        sizes[options["optimizer"]] = run.optimizer_state_bytes(optimizer)
    # torch: m and v in float32 plus a step tensor per parameter; quantlab: one byte per element and
    # a float32 absmax per 256-element block for m and v of the large tensor, float32 for the small one
    assert sizes["torch-adamw"] == 2 * 4 * 8292 + 2 * 4
    assert sizes["quantlab-adamw"] == 2 * (8192 + 4 * 8192 // 256) + 2 * 4 * 100


def test_make_optimizer_passes_the_state_options():
    params = [torch.nn.Parameter(torch.randn(10))]
    optimizer = make_optimizer(load_config({"optimizer": "quantlab-adamw", "state_bits": 32, "block_size": 64,
                                            "code": "linear", "lr": 0.01, "betas": [0.8, 0.9]}), params)
    group = optimizer.param_groups[0]
    assert (group["state_bits"], group["block_size"], group["lr"], group["betas"]) == (32, 64, 0.01, (0.8, 0.9))
    assert (group["signed_code"].name, group["unsigned_code"].name) == ("linear8-signed", "linear8-unsigned")
    assert isinstance(make_optimizer(load_config({"optimizer": "torch-adamw"}), params), torch.optim.AdamW)


def crash_at(monkeypatch, crash_step):
    """Interrupt the run (as Ctrl-C would) right after step crash_step's metrics line is written."""
    update = progress.Progress.update

    def update_or_crash(self, record):
        update(self, record)
        if record["step"] == crash_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress.Progress, "update", update_or_crash)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], QuantizedState):
            assert (a[key].code, a[key].block_size) == (b[key].code, b[key].block_size), key
            assert torch.equal(a[key].indices, b[key].indices) and torch.equal(a[key].absmax, b[key].absmax), key
        elif torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("options", OPTIMIZERS)
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch, options):
    # two epochs of three steps, checkpoints after steps 2 and 4 (both mid-epoch), interrupted after step 5
    config = tiny_config(train_subset=48, epochs=2, checkpoint_every=2, **options)
    run.pretrain(config, tmp_path / "straight", progress=False)
    crash_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run.pretrain(config, tmp_path / "resumed", progress=False)
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 5
    monkeypatch.undo()
    run.pretrain(config, tmp_path / "resumed", resume=True, progress=False)

    straight, resumed = (checkpoint.load_checkpoint(tmp_path / name) for name in ("straight", "resumed"))
    assert straight["step"] == resumed["step"] == 6
    assert_same_state(straight["model"], resumed["model"])
    assert_same_state(straight["optimizer"]["state"], resumed["optimizer"]["state"])
    if config.optimizer == "quantlab-adamw":  # the states compared are the ones the config asks for
        states = resumed["optimizer"]["state"].values()
        eight_bit = any(isinstance(v, QuantizedState) for s in states for v in s.values())
        assert eight_bit == (config.state_bits == 8)
    lines = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("straight", "resumed")}
    keys = ("step", "epoch", "loss", "lr")
    assert [[m[k] for k in keys] for m in lines["resumed"]] == [[m[k] for k in keys] for m in lines["straight"]]


def test_resume_refuses_a_changed_config_but_extends_epochs(tmp_path):
    config = tiny_config()
    run.pretrain(config, tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        run.pretrain(load_config(config.to_dict(), {"lr": 0.5}), tmp_path, resume=True, progress=False)
    with pytest.raises(FileExistsError):
        run.pretrain(config, tmp_path, progress=False)
    # what a run killed mid-write (kill -9, power loss) leaves next to the last good checkpoint: ignored
    (tmp_path / ".checkpoint.pt.12345.tmp").write_bytes(b"truncated")
    summary = run.pretrain(load_config(config.to_dict(), {"epochs": 2}), tmp_path, resume=True, progress=False)
    assert summary["steps"] == 4
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomically({"step": 1, "weights": torch.arange(3.0)}, path)

    def save_half_then_fail(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomically({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    saved = torch.load(path, weights_only=True)  # the first write, whole
    assert saved["step"] == 1 and torch.equal(saved["weights"], torch.arange(3.0))


def test_derived_seeds_differ_by_use_and_run():
    seeds = {loop.derived_seed(seed, use, i) for seed in (0, 1) for use in ("epoch", "augment") for i in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)


def test_evaluate_on_another_dataset_and_on_a_multi_label_one(tmp_path):
    """A run evaluated on the mosaic task (the medical-MAE protocol): mean AUC of a linear probe and of
    fine-tuning, in eval-fashion-mnist-mosaic.json beside the run's own eval.json."""
    run.pretrain(tiny_config(method="simclr", eval_subset=48, probe_epochs=5, finetune_epochs=1), tmp_path,
                   progress=False)
    result = evaluate.evaluate_run(tmp_path, finetune=True, dataset="fashion-mnist-mosaic")
    saved = json.loads((tmp_path / "eval-fashion-mnist-mosaic.json").read_text())
    assert saved == result and not (tmp_path / "eval.json").exists()
    assert result["dataset"] == "fashion-mnist-mosaic" and "knn_accuracy" not in result
    for key in ("linear", "finetune"):
        assert 0 <= result[f"{key}_mean_auc"] <= 1 and len(result[f"{key}_per_label_auc"]) == 10
    own = evaluate.evaluate_run(tmp_path)
    assert (tmp_path / "eval.json").exists() and 0 <= own["knn_accuracy"] <= 1
