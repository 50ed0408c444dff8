"""The sweep runner: medians and spreads over seeds, differences from fp32, resumable runs."""
import json

import pytest

from experiments.studies import sweep


def fake_run(method, optimizer, seed, knn, linear):
    return {"method": method, "optimizer": optimizer, "seed": seed, "knn_accuracy": knn, "linear_accuracy": linear,
            "optimizer_state_bytes": 100, "optimizer_ms_per_step": 1.0, "model_ms_per_step": 10.0, "wall_s": 5.0}


def test_summary_takes_medians_and_spreads_over_seeds_and_differences_from_fp32():
    runs = [fake_run("moco", "fp32", 0, 0.80, 0.70), fake_run("moco", "fp32", 1, 0.84, 0.72),
            fake_run("moco", "fp32", 2, 0.82, 0.90),
            fake_run("moco", "8bit", 0, 0.79, 0.71), fake_run("moco", "8bit", 1, 0.85, 0.73),
            fake_run("moco", "8bit", 2, 0.81, 0.75)]
    rows = {r["optimizer"]: r for r in sweep.summarize(runs)}
    assert rows["fp32"]["knn_accuracy"] == pytest.approx(0.82)
    assert rows["fp32"]["knn_accuracy_spread"] == pytest.approx(0.04)
    assert rows["fp32"]["linear_accuracy"] == pytest.approx(0.72)
    assert rows["8bit"]["knn_accuracy_minus_fp32"] == pytest.approx(0.81 - 0.82)
    assert rows["8bit"]["linear_accuracy_minus_fp32"] == pytest.approx(0.73 - 0.72)
    assert rows["fp32"]["seeds"] == [0, 1, 2]
    text = sweep.markdown(list(rows.values()))
    assert "| moco | fp32 | 3 | 82.0 ± 2.0 |" in text and "(-1.0)" in text


def test_summary_without_fp32_has_no_difference():
    rows = sweep.summarize([fake_run("simclr", "8bit", 0, 0.5, 0.5)])
    assert rows[0]["knn_accuracy_minus_fp32"] is None


def test_print_commands_lists_one_line_per_run(tmp_path, capsys):
    sweep.main(["--out", str(tmp_path), "--methods", "moco", "simclr", "--optimizers", "fp32", "8bit",
                "--seeds", "0", "1", "--set", "epochs=1", "--print-commands"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8
    assert all("pretrain" in line and "evaluate" in line and "--set epochs=1" in line for line in lines)
    assert not (tmp_path / "runs").exists()


def test_tiny_sweep_runs_evaluates_and_skips_finished_runs(tmp_path):
    args = ["--out", str(tmp_path), "--methods", "simclr", "--optimizers", "fp32", "8bit", "--seeds", "0",
            "--workers", "2", "--set", "train_subset=32", "--set", "batch_size=16", "--set", "eval_subset=64",
            "--set", "probe_epochs=5", "--set", "knn_k=5"]
    rows = sweep.main(args)
    assert {r["optimizer"] for r in rows} == {"fp32", "8bit"}
    saved = json.loads((tmp_path / "table.json").read_text())
    assert len(saved["runs"]) == 2 and all(0 <= r["knn_accuracy"] <= 1 for r in saved["runs"])
    # 8-bit state is smaller than fp32 state for the same model
    by = {r["optimizer"]: r for r in saved["runs"]}
    assert by["8bit"]["optimizer_state_bytes"] < by["fp32"]["optimizer_state_bytes"]
    log = tmp_path / "runs" / "simclr-8bit-seed0" / "log.txt"
    before = log.read_text()
    sweep.main(args)  # everything evaluated: nothing runs again
    assert log.read_text() == before


def test_method_set_applies_to_its_method_only_and_only_picks_runs(tmp_path, capsys):
    common = ["--out", str(tmp_path), "--methods", "moco", "mae", "--optimizers", "fp32", "8bit-linear", "--seeds", "0"]
    sweep.main([*common, "--method-set", "mae:backbone=vit-tiny", "--print-commands"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert [("backbone=vit-tiny" in line) for line in lines] == [False, False, True, True]
    assert all("code=linear" in line for line in lines[1::2]) and not any("code=" in line for line in lines[::2])
    for bad in (["--method-set", "backbone=vit-tiny"], ["--method-set", "simclr:lr=1"], ["--only", "4"]):
        with pytest.raises(SystemExit):
            sweep.main([*common, *bad, "--print-commands"])


def fake_run_dir(path, dataset, evaluations):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"dataset": dataset}))
    (path / "summary.json").write_text(json.dumps({
        "optimizer_state_bytes": 10, "elapsed_s": 1.0,
        "time_split": {"optimizer_s": {"median_ms": 1.0}, "model_s": {"median_ms": 2.0}}}))
    for name, values in evaluations.items():
        (path / name).write_text(json.dumps(values))


def test_eval_datasets_give_one_metric_per_dataset_and_wait_for_every_evaluation(tmp_path):
    datasets = ["fashion-mnist-subset", "mnist"]
    assert sweep.run_result(tmp_path / "not-started", datasets) is None
    # pretrained on the procedural set: both evaluations are on other datasets
    fake_run_dir(tmp_path / "a", "procedural", {"eval-fashion-mnist-subset.json": {"knn_accuracy": 0.5},
                                                "eval-mnist.json": {"knn_accuracy": 0.25, "linear_accuracy": 0.75}})
    result = sweep.run_result(tmp_path / "a", datasets)
    assert result["knn_accuracy@fashion-mnist-subset"] == 0.5
    assert result["knn_accuracy@mnist"] == 0.25 and result["linear_accuracy@mnist"] == 0.75
    assert "knn_accuracy" not in result
    # pretrained on one of them: its own evaluation is eval.json; a missing one means not finished
    fake_run_dir(tmp_path / "b", "fashion-mnist-subset", {"eval.json": {"knn_accuracy": 0.5}})
    assert sweep.run_result(tmp_path / "b", datasets) is None
    (tmp_path / "b" / "eval-mnist.json").write_text(json.dumps({"knn_accuracy": 0.125}))
    assert sweep.run_result(tmp_path / "b", datasets)["knn_accuracy@mnist"] == 0.125
    rows = sweep.summarize([{"method": "moco", "optimizer": "fp32", "seed": 0, **result}])
    text = sweep.markdown(rows)
    assert "k-NN % on mnist" in text and "linear probe % on mnist" in text and "| 25.0 ± 0.0 |" in text


def test_multilabel_metrics_are_tabulated(tmp_path):
    fake_run_dir(tmp_path / "a", "fashion-mnist-mosaic", {"eval.json": {"linear_mean_auc": 0.7,
                                                                        "finetune_mean_auc": 0.8}})
    result = sweep.run_result(tmp_path / "a")
    rows = sweep.summarize([{"method": "mae", "optimizer": "8bit", "seed": 0, **result}])
    assert "fine-tuned mean AUC %" in sweep.markdown(rows) and rows[0]["finetune_mean_auc"] == 0.8
