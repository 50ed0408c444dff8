"""paper_figs: one command regenerates every figure and table from the recorded results; missing
optional results are skipped, not fatal; the numbers come from the JSON, not the scripts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "paper_figs" / "results"


def run(*args, module="paper_figs"):
    # paper_figs is not an installed package: run it, like its users, from the repository root
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_one_command_makes_every_figure_from_the_recorded_results(tmp_path):
    done = run("--out", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("fig_code_error.png", "fig_code_error.md", "fig_quantize_speed.png", "fig_quantize_speed.md",
                 "fig_optim_speed.png", "table_optim_speed.md"):
        path = tmp_path / name
        assert path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table's numbers are the recorded ones
    single = json.loads((RESULTS / "bench_optim_single.json").read_text())
    ours = next(r for r in single["rows"] if r["optimizer"] == "quantlab Adam 8-bit")
    table = (tmp_path / "table_optim_speed.md").read_text()
    assert f"| quantlab Adam 8-bit | {ours['ms_per_step']:.1f} |" in table
    codes = json.loads((RESULTS / "code_error.json").read_text())
    row = next(r for r in codes["by_block"]
               if r["data"] == "Adam v" and r["code"] == "linear" and r["block_size"] == 256)
    cell = f"{row['relative_error']:.2e} ({row['zero_rounding_fraction']:.1%})"
    assert cell in (tmp_path / "fig_code_error.md").read_text()
    if not list(RESULTS.glob("ssl_*.json")):
        assert "table_ssl: skipped" in done.stdout
    # what is committed under paper_figs/ is what the recorded results render to
    for table in tmp_path.glob("*.md"):
        if table.name != "README.md":
            assert table.read_text() == (ROOT / "paper_figs" / "out" / table.name).read_text(), table.name
    assert (tmp_path / "README.md").read_text().replace("](fig_", "](out/fig_") == \
        (ROOT / "paper_figs" / "README.md").read_text()


def test_missing_results_are_skipped_with_the_command_that_records_them(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    shutil.copy(RESULTS / "bench_optim_models.json", results)  # one of the two optimizer files only
    done = run("--results", results, "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fig_code_error: skipped" in done.stdout and "paper_figs.record_code_error" in done.stdout
    assert "fig_quantize_speed: skipped" in done.stdout
    assert "table_ssl: skipped" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "fig_optim_speed.png", "table_optim_speed.md"]
    assert "ResNet-18" in (out / "table_optim_speed.md").read_text()


def test_ssl_results_are_tabulated_when_present(tmp_path):
    (tmp_path / "ssl_knn.json").write_text(json.dumps(
        {"rows": [{"method": "simclr", "optimizer": "adamw-8bit", "knn_acc": 0.8125, "curve": [1, 2]}]}))
    (tmp_path / "ssl_flat.json").write_text(json.dumps({"method": "moco", "linear_acc": 0.75}))
    done = run("--results", tmp_path, "--out", tmp_path / "out", module="paper_figs.table_ssl")
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "table_ssl.md").read_text()
    assert "| method | optimizer | knn_acc |" in text and "| simclr | adamw-8bit | 0.8125 |" in text
    assert "| moco | 0.75 |" in text and "curve" not in text


def test_a_failing_script_fails_the_command(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "code_error.json").write_text(json.dumps({"by_block": [{"data": "x"}], "by_bits": [{}]}))
    done = run("--results", results, "--out", tmp_path / "out", "--only", "fig_code_error")
    assert done.returncode == 1 and "fig_code_error: FAILED" in done.stdout


def test_recording_the_code_error_study(tmp_path):
    done = run("--n", "4096", "--out", tmp_path, module="paper_figs.record_code_error")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "code_error.json").read_text())
    assert result["n"] == 4096 and len(result["by_block"]) == 4 * 5 * 8 - 8  # no symmetric code for v
    assert {r["block_size"] for r in result["by_bits"]} == {256, "tensor"}
    done = run("--results", tmp_path, "--out", tmp_path / "out", module="paper_figs.fig_code_error")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fig_code_error.md", "fig_code_error.png"]


@pytest.mark.parametrize("module", ["fig_code_error", "fig_quantize_speed", "fig_optim_speed", "table_optim_speed",
                                    "table_ssl", "table_lm"])
def test_each_script_runs_on_its_own(module, tmp_path):
    done = run("--out", tmp_path, module=f"paper_figs.{module}")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout or "skipped" in done.stdout


def test_protocol_records_are_filed_and_tabulated_with_their_variants(tmp_path):
    def rows(knn):
        return [{"method": "moco", "optimizer": "fp32", "seeds": [0], "knn_accuracy@mnist": knn,
                 "knn_accuracy@mnist_spread": 0.0, "knn_accuracy@mnist_minus_fp32": 0.0, "optimizer_state_bytes": 1024,
                 "optimizer_ms_per_step": 1.0, "model_ms_per_step": 2.0}]

    record = {"protocol": "pass", "what": "two pretraining sets", "command": "python -m experiments.protocols pass",
              "variants": [{"label": "pretrain-procedural", "command": "sweep A", "rows": rows(0.5), "runs": [{}]},
                           {"label": "pretrain-fashion-mnist", "command": "sweep B", "rows": rows(0.75), "runs": [{}]}],
              "untrained": [{"backbone": "resnet-tiny", "seeds": 3, "knn_accuracy@mnist": 0.25,
                             "knn_accuracy@mnist_spread": 0.5}]}
    (tmp_path / "record.json").write_text(json.dumps(record))
    results = tmp_path / "results"
    results.mkdir()
    done = run(tmp_path / "record.json", "--results", results, module="paper_figs.record_ssl")
    assert done.returncode == 0, done.stderr
    assert json.loads((results / "ssl_pass.json").read_text()) == record
    done = run("--results", results, "--out", tmp_path / "out", module="paper_figs.table_ssl")
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "table_ssl.md").read_text()
    assert "| moco (pretrain-procedural) | fp32 | 1 | 50.0 ± 0.0 |" in text
    assert "| moco (pretrain-fashion-mnist) | fp32 | 1 | 75.0 ± 0.0 |" in text
    assert "k-NN % on mnist" in text and "`sweep A`" in text and "`sweep B`" in text
    assert "| resnet-tiny | 3 | 25.0 ± 25.0 |" in text

    record["variants"][1]["runs"] = []  # an unfinished variant is not filed
    (tmp_path / "record.json").write_text(json.dumps(record))
    assert run(tmp_path / "record.json", "--results", results, module="paper_figs.record_ssl").returncode != 0


def test_language_model_records_are_filed_and_tabulated(tmp_path):
    from experiments.studies import language

    study = language.Study("stability", "a two-cell study", {"8-bit / standard": {}, "32-bit / stable": {}}, (0, 1))
    runs = [{"cell": cell, "seed": seed, "final_val_loss": 2.0 + seed / 8 + (cell[0] == "8"), "unstable": None,
             "untrained_val_loss": 5.5, "unigram_val_loss": 3.25, "optimizer_state_bytes": 2048,
             "optimizer_ms_per_step": 1.5, "v_zero_fraction_max": None, "v_zero_fraction_max_per_tensor": None,
             "curve": [[0, 5.5], [10, 2.0 + seed / 8]]}
            for seed in (0, 1) for cell in study.cells]
    record = {"study": "stability", "what": study.what, "command": "python -m experiments.studies.language stability",
              "settings": {}, "cells": study.cells, "seeds": [0, 1], "runs": runs,
              "rows": language.cell_rows(study, runs)}
    (tmp_path / "record.json").write_text(json.dumps(record))
    results = tmp_path / "results"
    results.mkdir()
    done = run(tmp_path / "record.json", "--results", results, module="paper_figs.record_lm")
    assert done.returncode == 0, done.stderr
    done = run("--results", results, "--out", tmp_path / "out", module="paper_figs.table_lm")
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "table_lm_stability.md").read_text()
    assert "| 8-bit / standard | 2 | 0 |  | 3.062 | 0.125 | 21.38 |" in text
    assert "| 32-bit / stable | 2 | 0 |  | 2.062 | 0.125 |" in text
    assert "unigram (byte frequencies of train) 3.250 nats" in text and "the untrained model 5.500 nats" in text
    assert (tmp_path / "out" / "fig_lm_stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    record["runs"] = runs[1:]  # a study with a run missing is not filed
    (tmp_path / "record.json").write_text(json.dumps(record))
    done = run(tmp_path / "record.json", "--results", results, module="paper_figs.record_lm")
    assert done.returncode != 0 and "1 runs are not finished" in done.stderr
