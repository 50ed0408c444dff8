"""Tables and figures of the language-model studies, once recorded: per results/lm_STUDY.json
(``python -m experiments.studies.language STUDY``, filed by ``python -m paper_figs.record_lm``)
out/table_lm_STUDY.md and out/fig_lm_STUDY.png (validation-loss curves, one panel a cell); for the
state-bits study also out/fig_lm_state_bits_by_code.png (final loss against state bits, one line a code)."""
from __future__ import annotations

import json
from pathlib import Path

from experiments.studies import language

from .common import Skip, run_one, save_text


def make(results: Path, out: Path) -> list[Path]:
    paths = sorted(Path(results).glob("lm_*.json"))
    if not paths:
        raise Skip(f"no lm_*.json in {results}; record them with `make lm-studies`")
    written = []
    for path in paths:
        record = json.loads(path.read_text())
        name = path.stem.removeprefix("lm_")
        written.append(save_text(language.markdown(record), Path(out) / f"table_lm_{name}.md"))
        written.append(language.plot_curves(record, Path(out) / f"fig_lm_{name}.png"))
        if record["study"] == "state-bits":
            written.append(language.plot_state_bits(record, Path(out) / "fig_lm_state_bits_by_code.png"))
    return written


if __name__ == "__main__":
    run_one(make)
