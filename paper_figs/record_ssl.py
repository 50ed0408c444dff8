"""File a protocol's record for table_ssl: python -m paper_figs.record_ssl results/ssl/pass/record.json ...

Each record.json (written by ``python -m experiments.studies.protocols PROTOCOL``) is checked to hold every
variant's finished runs and copied to paper_figs/results/ssl_PROTOCOL.json (dashes as underscores).
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import RESULTS, file_records


def file_record(path: Path, results: Path = RESULTS) -> Path:
    record = json.loads(Path(path).read_text())
    if not {"protocol", "what", "command", "variants"} <= set(record):
        raise ValueError(f"{path} is not a protocol record (python -m experiments.studies.protocols writes them)")
    empty = [variant["label"] for variant in record["variants"] if not variant["runs"]]
    if empty:
        raise ValueError(f"{path}: variants {empty} have no finished runs yet")
    target = Path(results) / f"ssl_{record['protocol'].replace('-', '_')}.json"
    target.write_text(json.dumps(record, indent=2) + "\n")
    return target


def main(argv=None):
    file_records(file_record, __doc__, argv)


if __name__ == "__main__":
    main()
