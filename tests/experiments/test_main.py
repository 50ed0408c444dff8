"""`python -m experiments`: config layering and errors, pretrain / evaluate / compare, and the demo
end to end at toy size."""
import csv
import json

import pytest

from experiments import __main__ as cli
from experiments.engine.config import RunConfig, load_config, read_config_file

TINY_FLAGS = ["--train-subset", "32", "--batch-size", "16", "--threads", "1", "--set", "augment.output_size=14",
              "--set", "method_options.queue_size=32", "--set", "eval_subset=40", "--set", "knn_k=5",
              "--set", "probe_epochs=5", "--quiet"]


def config_from(argv):
    return cli.train_config(cli.parser().parse_args(["pretrain", "--out", "unused", *argv]))


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    (tmp_path / "run.toml").write_text('optimizer = "quantlab-adamw"\nlr = 0.01\nepochs = 3\nbetas = [0.8, 0.9]\n'
                                       '[augment]\nblur_p = 0.0\ncrop_scale = [0.5, 1.0]\n'
                                       '[method_options]\nqueue_size = 128\n')
    config = config_from(["--config", str(tmp_path / "run.toml"), "--epochs", "5", "--optimizer", "torch-adamw",
                          "--set", "augment.flip_p=0.25", "--set", "seed=7", "--seed", "3"])
    assert (config.epochs, config.optimizer, config.lr, config.betas) == (5, "torch-adamw", 0.01, (0.8, 0.9))
    assert config.seed == 7  # --set comes last
    assert config.state_bits == 32  # torch's AdamW resolves the unset state_bits to float32
    augment = config.augment
    assert (augment["blur_p"], augment["crop_scale"], augment["flip_p"]) == (0.0, (0.5, 1.0), 0.25)
    assert config.augment["jitter_p"] == RunConfig().augment["jitter_p"]  # a nested table merges key by key
    assert config.method_options == {"queue_size": 128}
    assert config.batch_size == RunConfig().batch_size


def test_json_and_toml_files_give_the_same_config(tmp_path):
    values = {"method": "simclr", "lr": 0.003, "augment": {"solarize_p": 0.2}, "train_subset": 100}
    (tmp_path / "run.json").write_text(json.dumps(values))
    (tmp_path / "run.toml").write_text('method = "simclr"\nlr = 0.003\ntrain_subset = 100\n'
                                       '[augment]\nsolarize_p = 0.2\n')
    assert read_config_file(tmp_path / "run.json") == read_config_file(tmp_path / "run.toml") == values
    assert config_from(["--config", str(tmp_path / "run.toml")]) == load_config(values)


def test_config_round_trips_through_json(tmp_path):
    config = load_config({"method": "simclr", "optimizer": "quantlab-adamw", "state_bits": 32, "code": "linear",
                          "betas": [0.85, 0.95], "augment": {"crop_ratio": [0.5, 2.0]}, "train_subset": 10,
                          "finetune_fractions": [1.0, 0.5], "method_options": {"temperature": 0.3}})
    config.save(tmp_path / "config.json")
    assert RunConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == config


@pytest.mark.parametrize("argv, message", [
    (["--set", "learning_rate=0.1"], "unknown config key.*learning_rate"),
    (["--set", "augment.blurr_p=0.1"], "unknown augment option.*blurr_p"),
    (["--set", "lr"], "key=value"),
    (["--state-bits", "9"], "state_bits must be one of"),
    (["--optimizer", "torch-adamw", "--state-bits", "8"], "float32"),
    (["--optimizer", "bnb-adamw8bit", "--set", "block_size=128"], "256-element"),
    (["--method", "byol"], "method must be one of"),
    (["--set", "betas=[0.9]"], "betas"),
    (["--epochs", "0"], "epochs"),
])
def test_bad_config_is_a_clear_error(argv, message):
    with pytest.raises(ValueError, match=message):
        config_from(argv)


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
    (tmp_path / "run.toml").write_text("lr = 0.1\nwarmup = 2\n")
    with pytest.raises(ValueError, match="warmup"):
        config_from(["--config", str(tmp_path / "run.toml")])
    (tmp_path / "run.yaml").write_text("lr: 0.1\n")
    with pytest.raises(ValueError, match="toml or .json"):
        config_from(["--config", str(tmp_path / "run.yaml")])


def test_pretrain_resume_and_evaluate_from_the_command_line(tmp_path):
    run = tmp_path / "run"
    summary = cli.main(["pretrain", *TINY_FLAGS, "--optimizer", "quantlab-adamw", "--out", str(run)])
    assert summary["steps"] == 2
    # --resume reads the run's config.json: only the extended epochs need saying
    summary = cli.main(["pretrain", "--out", str(run), "--resume", "--epochs", "2", "--quiet"])
    assert summary["steps"] == 4 and json.loads((run / "config.json").read_text())["epochs"] == 2
    result = cli.main(["evaluate", str(run)])
    assert json.loads((run / "eval.json").read_text()) == result
    assert result["step"] == 4 and result["train_images"] == result["test_images"] == 40
    assert 0 <= result["knn_accuracy"] <= 1 and 0 <= result["linear_accuracy"] <= 1


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cli.main(["demo", "--quick", "--out", str(out)])
    return out


def test_quick_demo_compares_fp32_and_8bit_adamw(demo_dir):
    rows = json.loads((demo_dir / "compare.json").read_text())
    by_run = {r["run"]: r for r in rows}
    assert {"torch-adamw-fp32", "quantlab-adamw-8bit"} <= set(by_run)
    for row in rows:
        assert 0 <= row["knn_accuracy"] <= 1 and 0 <= row["linear_accuracy"] <= 1
        assert (demo_dir / row["run"] / "eval.json").exists()
    # nearly all parameters sit in tensors of >= min_8bit_size elements, whose states take 8 bits
    state_bytes = {run: row["optimizer_state_bytes"] for run, row in by_run.items()}
    assert state_bytes["quantlab-adamw-8bit"] < 0.5 * state_bytes["torch-adamw-fp32"]
    table = (demo_dir / "compare.md").read_text()
    assert all(f"| {run} |" in table for run in by_run) and "Total demo time" in table
    assert (demo_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_command_tabulates_the_runs_given(demo_dir, tmp_path):
    runs = [demo_dir / "torch-adamw-fp32", demo_dir / "quantlab-adamw-8bit"]
    rows = cli.main(["compare", *map(str, runs), "--out", str(tmp_path)])
    assert [r["run"] for r in rows] == ["torch-adamw-fp32", "quantlab-adamw-8bit"]
    with open(tmp_path / "compare.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["optimizer"] for r in saved] == ["torch-adamw", "quantlab-adamw"]
    assert [r["state_bits"] for r in saved] == ["32", "8"]
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    with pytest.raises(ValueError, match="distinct"):
        cli.main(["compare", str(runs[0]), str(runs[0]), "--out", str(tmp_path)])


def test_lm_train_resolves_its_config_the_same_way_and_runs(tmp_path, capsys):
    from experiments.engine.language_model import LMConfig

    (tmp_path / "lm.toml").write_text('code = "linear"\nsteps = 50\nwidth = 32\n')
    argv = ["lm-train", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "lm.toml"), "--steps", "6",
            "--set", "embedding=stable", "--set", "corpus=shakespeare-slice", "--set", "depth=1",
            "--set", "warmup_steps=1", "--set", "eval_every=3", "--set", "eval_tokens=256", "--threads", "1",
            "--quiet"]
    config = cli.train_config(cli.parser().parse_args(argv), cli.LM_FLAGS, LMConfig)
    assert (config.code, config.steps, config.width, config.embedding) == ("linear", 6, 32, "stable")
    summary = cli.main(argv)
    assert summary["steps"] == 6 and json.loads(capsys.readouterr().out)["steps"] == 6
    assert json.loads((tmp_path / "run" / "config.json").read_text())["code"] == "linear"
    with pytest.raises(ValueError, match="library must be one of"):
        cli.main([*argv, "--overwrite", "--set", "library=numpy"])
