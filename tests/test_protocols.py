"""The recorded protocols: each variant is a sweep with the protocol's settings; the record gathers them."""
import json

from experiments import protocols


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
    for variant in protocols.PROTOCOLS["pass"]["variants"]:
        folder = tmp_path / "pass" / variant
        folder.mkdir(parents=True)
        (folder / "table.json").write_text(json.dumps({"command": f"sweep {variant}", "runs": [{"seed": 0}],
                                                       "summary": [{"method": "moco", "optimizer": "fp32"}]}))
    record = protocols.record("pass", tmp_path)
    assert [v["label"] for v in record["variants"]] == ["pretrain-procedural", "pretrain-fashion-mnist"]
    assert record["variants"][0]["command"] == "sweep pretrain-procedural"
    assert json.loads((tmp_path / "pass" / "record.json").read_text()) == record
