"""File a language-model study's record: python -m paper_figs.record_lm results/lm/stability/record.json ...

Each record.json (written by ``python -m experiments.studies.language STUDY``) is checked to hold a
finished run of every cell and seed, and copied to paper_figs/results/lm_STUDY.json (dashes as underscores).
"""
from __future__ import annotations

from pathlib import Path

from .common import file_records


def filed_name(record: dict, path: Path) -> str:
    if not {"study", "what", "command", "cells", "seeds", "runs", "rows"} <= set(record):
        raise ValueError(f"{path} is not a language-model study record (python -m experiments.studies.language "
                         f"writes them)")
    finished = {(run["cell"], run["seed"]) for run in record["runs"]}
    missing = [f"{cell} seed {seed}" for seed in record["seeds"] for cell in record["cells"]
               if (cell, seed) not in finished]
    if missing:
        raise ValueError(f"{path}: {len(missing)} runs are not finished yet, e.g. {missing[:3]}")
    return f"lm_{record['study'].replace('-', '_')}.json"


def main(argv=None):
    file_records(filed_name, __doc__, argv)


if __name__ == "__main__":
    main()
