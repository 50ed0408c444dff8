"""The language-model studies: the instability verdict, run names, the per-cell table, and the demo end to
end (processes, record, table, figure, and a second call that finds everything done)."""
import json

import pytest

from experiments.studies import language

SUMMARY = {"diverged_at": None, "final_val_loss": 2.0, "unigram_val_loss": 3.3}


@pytest.mark.parametrize("summary, losses, verdict", [
    (SUMMARY, [3.0] * 20 + [2.5] * 20, None),
    ({**SUMMARY, "diverged_at": 7, "final_val_loss": None}, [3.0] * 7, "diverged"),
    ({**SUMMARY, "final_val_loss": 3.3}, [3.0] * 20, "not below unigram"),
    (SUMMARY, [3.0] * 20 + [2.0] * 20 + [2.6] * 10 + [2.0] * 20, "loss spike"),  # 10-step mean +0.6 nats
    (SUMMARY, [3.0] * 20 + [2.0] * 20 + [2.4] * 10 + [2.0] * 20, None),  # +0.4 nats: noise, not a spike
    (SUMMARY, [2.0, 9.0] + [2.0] * 30, None),  # an early bad step: the mean falls from it, never rises above a minimum
])
def test_instability_verdict(summary, losses, verdict):
    assert language.instability(summary, losses) == verdict


def test_a_single_outlier_step_after_the_minimum_is_a_spike_only_when_it_moves_the_mean_enough():
    settled = [2.0] * 30
    assert language.instability(SUMMARY, settled + [6.0] + settled) is None  # mean + 0.4
    assert language.instability(SUMMARY, settled + [7.5] + settled) == "loss spike"  # mean + 0.55


def test_run_names_are_distinct_across_every_study():
    for make in language.STUDIES.values():
        study = make()
        names = [language.run_name(*r) for r in study.plan()]
        assert len(set(names)) == len(names) == len(study.cells) * len(study.seeds)


def test_every_cell_of_every_study_is_a_valid_config():
    from experiments.engine.config import load_config
    from experiments.engine.language_model import LMConfig

    for make in language.STUDIES.values():
        study = make()
        for cell in study.cells:
            load_config(study.run_settings(cell, 0), kind=LMConfig)


def test_the_state_bits_study_and_its_figure(tmp_path):
    study = language.state_bits_study()
    assert len(study.cells) == 1 + len(language.STATE_BITS) * len(language.STATE_BIT_CODES)
    settings = study.run_settings("2-bit, zero-free linear v, rank-1", 1)
    assert (settings["state_bits"], settings["block_size"], settings["unsigned_code"],
            settings["unsigned_normalization"], settings["seed"]) == (2, 128, "linear-zero-free", "rank1", 1)
    base = {"untrained_val_loss": 5.5, "unigram_val_loss": 3.3}
    runs = [{**base, "cell": cell, "seed": 0, "final_val_loss": 2.0 + ("linear" in cell), "unstable": None}
            for cell in study.cells]
    runs[1] = {**runs[1], "final_val_loss": 6.0, "unstable": "not below unigram"}
    rows = [{"cell": cell, "val_loss": 2.0, **base} for cell in study.cells]
    path = language.plot_state_bits({"study": "state-bits", "runs": runs, "rows": rows}, tmp_path / "bits.png")
    assert path.stat().st_size > 10_000


def test_stability_study_is_the_papers_grid():
    study = language.stability_study()
    assert len(study.cells) == 10 and study.seeds == tuple(range(10))
    settings = study.run_settings("8-bit linear, one block a tensor / stable", 3)
    assert (settings["code"], settings["block_size"], settings["embedding"]) == ("linear", 0, "stable")
    assert settings["seed"] == 3
    assert settings["algorithm"] == "adam" and settings["lr"] == language.STABILITY_LR


def test_cell_rows_report_stable_runs_only_and_why_the_others_failed():
    study = language.Study("t", "", {"a": {}, "b": {}}, (0, 1, 2))
    base = {"untrained_val_loss": 5.5, "unigram_val_loss": 3.3, "optimizer_state_bytes": 100,
            "optimizer_ms_per_step": 1.0, "v_zero_fraction_max": None}
    runs = [{**base, "cell": "a", "seed": s, "final_val_loss": 2.0 + s / 10, "unstable": None} for s in range(3)]
    runs += [{**base, "cell": "b", "seed": 0, "final_val_loss": 2.0, "unstable": None, "v_zero_fraction_max": 0.1},
             {**base, "cell": "b", "seed": 1, "final_val_loss": None, "unstable": "diverged",
              "v_zero_fraction_max": 0.3},
             {**base, "cell": "b", "seed": 2, "final_val_loss": 3.4, "unstable": "not below unigram",
              "v_zero_fraction_max": 0.2}]
    a, b = language.cell_rows(study, runs)
    assert (a["runs"], a["unstable_percent"], a["val_loss"], a["val_loss_spread"]) == (3, 0, 2.1, pytest.approx(0.2))
    assert b["unstable_percent"] == pytest.approx(200 / 3) and b["val_loss"] == 2.0 and b["val_loss_spread"] == 0
    assert b["unstable_why"] == "1 diverged, 1 not below unigram" and b["v_zero_percent"] == pytest.approx(20)


def test_the_quick_demo_runs_records_and_resumes(tmp_path, capsys):
    record = language.demo(tmp_path, quick=True)
    assert [row["cell"] for row in record["rows"]] == list(language.DEMO_CELLS)
    assert all(row["runs"] == 1 and row["untrained_val_loss"] > row["unigram_val_loss"] for row in record["rows"])
    saved = json.loads((tmp_path / "record.json").read_text())
    assert saved["rows"] == record["rows"] and len(saved["runs"]) == 3
    table = (tmp_path / "table.md").read_text()
    assert "unigram (byte frequencies of train)" in table and "python -m experiments lm-demo --quick" in table
    assert (tmp_path / "curves.png").stat().st_size > 0
    capsys.readouterr()
    language.demo(tmp_path, quick=True)
    assert "3 of 3 runs finished; 0 to go" in capsys.readouterr().out


def test_print_commands_prints_one_line_a_run(tmp_path, capsys):
    language.main(["lr-sweep", "--out", str(tmp_path), "--seeds", "0", "--print-commands", "--workers", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(language.LR_SWEEP)
    assert all("lm-train" in line and "--set lr=" in line for line in lines)
