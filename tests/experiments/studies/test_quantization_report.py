"""The quantization-error report behind `make demo`, at a tiny size."""
import json

from experiments.studies import quantization_report


def test_quantization_report_writes_table_data_and_figure(tmp_path):
    rows = quantization_report.main(["--n", "4096", "--out", str(tmp_path)])
    for name in ("report.md", "report.csv", "report.json", "relative_error.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert {r["data"] for r in rows} == {"normal", "heavy-tailed t(2)", "Adam m", "Adam v"}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert len(saved) == len(rows)
    # block-wise quantization never loses to one block for the whole tensor with the dynamic map
    dynamic = {r["block_size"]: r["relative_error"] for r in rows
               if r["data"] == "heavy-tailed t(2)" and r["code"] == "dynamic8-signed"}
    assert dynamic[64] < dynamic["tensor"]
