"""The recorded protocols: each variant is a sweep with the protocol's settings; the record gathers them."""
import json

import pytest

from experiments.studies import protocols


def test_every_protocol_prints_one_line_per_run_with_its_variant_settings(capsys):
    expected = {"five-methods": 5 * 4 * 3, "medical-mae": 4 * 2, "pass": 2 * 2 * 3}
    for protocol, runs in expected.items():
        protocols.main([protocol, "--out", "somewhere", "--print-commands"])
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == runs, protocol
    protocols.main(["medical-mae", "--out", "somewhere", "--print-commands"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum("method_options.mask_ratio=0.9 " in line for line in lines) == 4
    assert sum("augment.crop_scale=[0.5,1.0]" in line for line in lines) == 4
    assert all("--finetune" in line and "dataset=fashion-mnist-mosaic" in line for line in lines)
    protocols.main(["pass", "--out", "somewhere", "--print-commands"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum("dataset=procedural" in line for line in lines) == 6
    assert all(line.count("--dataset ") == 3 for line in lines)  # three evaluations a run


def test_record_gathers_each_variants_table(tmp_path):
    for variant in protocols.PROTOCOLS["pass"].variants:
        folder = tmp_path / "pass" / variant
        folder.mkdir(parents=True)
        (folder / "table.json").write_text(json.dumps({"command": f"sweep {variant}", "runs": [{"seed": 0}],
                                                       "summary": [{"method": "moco", "optimizer": "fp32"}]}))
    record = protocols.record("pass", tmp_path)
    assert [v["label"] for v in record["variants"]] == ["pretrain-procedural", "pretrain-fashion-mnist"]
    assert record["variants"][0]["command"] == "sweep pretrain-procedural"
    assert json.loads((tmp_path / "pass" / "record.json").read_text()) == record


def test_evaluation_options_read_the_protocols_sweep_arguments():
    assert protocols.evaluation_options("pass") == (["fashion-mnist-subset", "mnist", "animal-mnist"], False)
    assert protocols.evaluation_options("medical-mae") == ([None], True)
    assert protocols.evaluation_options("five-methods") == ([None], False)


def test_untrained_baselines_evaluate_each_backbone_as_its_runs_initialise_it(tmp_path, monkeypatch):
    from experiments.engine import evaluate, run
    from experiments.engine.config import load_config

    tiny = protocols.Protocol("", {"a": protocols.Sweep(methods=("simclr",))})
    monkeypatch.setitem(protocols.PROTOCOLS, "tiny", tiny)
    config = load_config({"method": "simclr", "train_subset": 32, "batch_size": 16, "threads": 1,
                          "eval_subset": 40, "probe_epochs": 5, "knn_k": 5, "checkpoint_every": 0})
    for seed in (0, 1):
        run_dir = tmp_path / "tiny" / "a" / "runs" / f"simclr-fp32-seed{seed}"
        run.pretrain(load_config(config.to_dict(), {"seed": seed}), run_dir, progress=False)
        evaluate.evaluate_run(run_dir)
    rows = protocols.untrained_baselines("tiny", tmp_path)
    assert [(r["backbone"], r["seeds"]) for r in rows] == [("resnet-tiny", 2)]
    expected = [evaluate.evaluate_backbone(run.build_method(load_config(config.to_dict(), {"seed": seed})).backbone,
                                        config)["knn_accuracy"] for seed in (0, 1)]
    assert rows[0]["knn_accuracy"] == pytest.approx(sum(expected) / 2)
    assert rows[0]["knn_accuracy_spread"] == pytest.approx(abs(expected[0] - expected[1]))
    assert json.loads((tmp_path / "tiny" / "untrained.json").read_text()) == rows
