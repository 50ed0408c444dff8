"""Language-model runs at toy sizes: every library and algorithm, bit-identical resume, divergence
recorded rather than raised, one block a tensor, the zero-v statistic, and config checks."""
import importlib.util
import json

import pytest
import torch

import quantlab.optim
from experiments.engine import language_model as lm
from experiments.engine.config import load_config

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
TINY = {"corpus": "shakespeare-slice", "context": 16, "width": 32, "depth": 1, "heads": 2, "batch_size": 4,
        "steps": 8, "warmup_steps": 2, "eval_every": 4, "eval_tokens": 512, "checkpoint_every": 0, "threads": 1,
        "min_8bit_size": 0}


def tiny(**changes) -> lm.LMConfig:
    return load_config(TINY, changes, kind=lm.LMConfig)


@pytest.mark.parametrize("options", [
    {"library": "torch", "algorithm": "adam"}, {"library": "torch", "algorithm": "sgd", "lr": 0.1},
    {"algorithm": "adamw"}, {"algorithm": "lion", "lr": 1e-4}, {"algorithm": "sgd", "lr": 0.1},
    {"algorithm": "adam", "state_bits": 32}, {"block_size": 0}, {"code": "linear"},
    {"state_bits": 4, "block_size": 128, "unsigned_code": "linear-zero-free", "unsigned_normalization": "rank1"},
    {"state_bits": 3, "block_size": 0, "unsigned_code": "dynamic-zero-free"},
    pytest.param({"library": "torchao", "state_bits": 4}, marks=pytest.mark.skipif(
        importlib.util.find_spec("torchao") is None, reason="no torchao")),
    pytest.param({"library": "bitsandbytes"}, marks=pytest.mark.skipif(not HAS_BNB, reason="no bitsandbytes"))],
    ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_every_optimizer_trains_and_the_run_directory_is_complete(tmp_path, options):
    summary = lm.train_language_model(tiny(**options), tmp_path, progress=False)
    assert summary["steps"] == 8 and summary["diverged_at"] is None
    validation = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in validation] == [0, 4, 8]
    assert summary["untrained_val_loss"] == validation[0]["val_loss"]
    assert summary["final_val_loss"] == validation[-1]["val_loss"] < summary["untrained_val_loss"]
    for name in ("config.json", "versions.json", "metrics.jsonl", "metrics.csv", "summary.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0
    assert lm.LMConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == tiny(**options)


def test_a_resumed_run_is_bit_identical_to_one_never_stopped(tmp_path, monkeypatch):
    config = tiny(checkpoint_every=3, code="linear")
    whole = lm.train_language_model(config, tmp_path / "whole", progress=False)
    batch_at = lm.batch_at

    def interrupted(tokens, config, step):
        if step == 5:
            raise KeyboardInterrupt
        return batch_at(tokens, config, step)

    monkeypatch.setattr(lm, "batch_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm.train_language_model(config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(lm, "batch_at", batch_at)
    with pytest.raises(FileExistsError):
        lm.train_language_model(config, tmp_path / "cut", progress=False)
    resumed = lm.train_language_model(config, tmp_path / "cut", resume=True, progress=False)
    for name in ("validation.jsonl",):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "cut" / name).read_text()
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("whole", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    states = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("whole", "cut")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert resumed["final_val_loss"] == whole["final_val_loss"]


def test_resuming_with_changed_training_settings_is_refused(tmp_path):
    lm.train_language_model(tiny(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr: 0.001 in the checkpoint"):
        lm.train_language_model(tiny(lr=2e-3), tmp_path, resume=True, progress=False)


def test_a_diverging_run_is_recorded_not_raised(tmp_path):
    summary = lm.train_language_model(tiny(library="torch", algorithm="sgd", lr=1e30, grad_clip=0.0), tmp_path,
                                      progress=False)
    assert summary["diverged_at"] is not None and summary["diverged_at"] < 8
    assert summary["final_val_loss"] is None and summary["steps"] == summary["diverged_at"]


def test_block_size_0_is_one_block_a_tensor():
    config = tiny(block_size=0)
    model = lm.build_model(config)
    optimizer = lm.build_optimizer(config, model)
    model.loss(*lm.batch_at(lm.load_corpus(config.corpus).train, config, 0)).backward()
    optimizer.step()
    states = [s for state in optimizer.state.values() for s in state.values()
              if isinstance(s, quantlab.optim.QuantizedState)]
    assert states and all(s.absmax.numel() == 1 for s in states)


def test_second_moment_zeros_counts_stored_zeros_where_the_gradient_is_not():
    p = torch.nn.Parameter(torch.zeros(1024))
    model = torch.nn.Module()
    model.p = p
    optimizer = quantlab.optim.Adam([p], lr=1e-3, min_8bit_size=0,
                                    unsigned_code=quantlab.codes.linear_code(signed=False))
    p.grad = torch.full((1024,), 1e-4)
    p.grad[0] = 1.0  # the block's absmax: 1e-8 of it rounds to 0 in the linear code
    p.grad[1] = 0.0
    optimizer.step()
    zeros = lm.second_moment_zeros(model, optimizer)
    assert zeros["per_tensor"]["p"] == pytest.approx(254 / 1023)  # the rest of the first block; one inactive
    assert zeros["fraction"] == zeros["per_tensor"]["p"]
    assert lm.second_moment_zeros(model, torch.optim.Adam([p])) is None


def test_second_moment_zeros_reads_rank1_states_and_a_zero_free_code_has_none():
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(32, 32))
    codes = {"linear": quantlab.codes.linear_code(4, signed=False),
             "zero-free": quantlab.codes.linear_code(4, signed=False, include_zero=False)}
    fractions = {}
    for name, code in codes.items():
        optimizer = quantlab.optim.Adam([model.w], lr=1e-3, min_8bit_size=0, state_bits=4, signed_code=None,
                                        unsigned_code=code, unsigned_normalization="rank1")
        model.w.grad = torch.full((32, 32), 1e-3)
        # every other element's row and column hold a 1: its scale is ~1, and 1e-6 of it rounds to 0 in
        # the linear code (rank-1 spares rows and columns of small values alone)
        model.w.grad[0, :], model.w.grad[:, 0] = 1.0, 1.0
        optimizer.step()
        assert isinstance(optimizer.state[model.w]["exp_avg_sq"], quantlab.optim.Rank1State)
        fractions[name] = lm.second_moment_zeros(model, optimizer)["fraction"]
    assert fractions["linear"] == pytest.approx(31 * 31 / 1024) and fractions["zero-free"] == 0


@pytest.mark.parametrize("changes, message", [
    ({"library": "torch", "state_bits": 8}, "state_bits must be 32"),
    ({"library": "bitsandbytes", "code": "linear"}, "bitsandbytes keeps 8-bit states"),
    ({"library": "bitsandbytes", "unsigned_normalization": "rank1"}, "bitsandbytes keeps 8-bit states"),
    ({"library": "torchao", "state_bits": 5}, "torchao is used for AdamW with 4- or 8-bit states"),
    ({"library": "torchao", "state_bits": 4, "algorithm": "lion"}, "torchao is used for AdamW"),
    ({"state_bits": 9}, "state_bits must be one of"),
    ({"state_bits": 4, "block_size": 127}, "block_size must be a multiple of 2"),
    ({"unsigned_code": "fp8"}, "unsigned_code must be one of"),
    ({"library": "torch", "algorithm": "lion"}, None),
    ({"corpus": "wiki"}, "corpus must be one of"),
    ({"width": 30, "heads": 4}, "does not split"),
    ({"warmup_steps": 9}, "exceeds steps"),
    ({"block_size": -1}, "block_size must be an integer >= 0"),
    ({"lr": -1}, "lr must be a non-negative number"),
    ({"colour": "red"}, "unknown config key"),
])
def test_bad_configs_are_refused(changes, message):
    if message is None:  # valid config, but torch has no Lion: refused when the optimizer is built
        config = tiny(**changes)
        with pytest.raises(ValueError, match="torch has no lion"):
            lm.build_optimizer(config, lm.build_model(config))
        return
    with pytest.raises(ValueError, match=message):
        tiny(**changes)
