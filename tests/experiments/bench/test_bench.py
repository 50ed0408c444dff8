"""Smoke runs of the benchmarks behind `make bench`, at tiny sizes."""
import json

import pytest

from experiments.bench import optim as bench_optim
from experiments.bench import quantize as bench_quantize


def test_benchmark_runs_and_records_ratios(tmp_path):
    result = bench_quantize.main(["--n", "5000", "--block-sizes", "256", "--repeats", "1", "--out", str(tmp_path)])
    impls = {r["impl"] for r in result["rows"]}
    assert {"reference (numpy)", "quantlab cpu", "quantlab cpu, out="} <= impls
    assert "vs bnb" in (tmp_path / "cpu.md").read_text()
    assert json.loads((tmp_path / "cpu.json").read_text())["environment"]["numba"]


def test_optimizer_benchmark_runs_and_records(tmp_path):
    rows = bench_optim.main(["--cases", "single", "--single-size", "20000", "--steps", "1", "--warmup", "1",
                             "--no-torchao", "--out", str(tmp_path)])
    by = {r["optimizer"]: r for r in rows}
    assert {"torch Adam (fused)", "quantlab Adam 8-bit", "quantlab Adam 32-bit"} <= set(by)
    # 8-bit state: 2 bytes a parameter plus two float32 absmax per 256-element block
    assert abs(by["quantlab Adam 8-bit"]["state_bytes_per_param"] - (2 + 8 / 256)) < 0.01
    assert by["quantlab Adam 32-bit"]["state_bytes_per_param"] == 8
    text = (tmp_path / "optim.md").read_text()
    assert "vs torch fused" in text and "x memory speed" in text
    # the roofline: fp32 Adam moves 28 bytes a parameter; quantlab reads the gradient once more
    assert bench_optim.bytes_moved_per_param("torch Adam (fused)", 4) == 28
    assert bench_optim.bytes_moved_per_param("quantlab Adam 32-bit", 4) == 32
    assert bench_optim.bytes_moved_per_param("quantlab Adam 8-bit", 2) == 8 + 4 * (1 + 4 / 256)
    bandwidth = json.loads((tmp_path / "optim.json").read_text())["environment"]["memory_bandwidth_gb_s"]
    assert by["torch Adam (fused)"]["roofline_ms"] == pytest.approx(28 * 20000 / (bandwidth * 1e9) * 1e3, rel=1e-12)
