"""File a protocol's record for table_ssl: python -m paper_figs.record_ssl results/ssl/pass/record.json ...

Each record.json (written by ``python -m experiments.studies.protocols PROTOCOL``) is checked to hold every
variant's finished runs and copied to paper_figs/results/ssl_PROTOCOL.json (dashes as underscores).
"""
from __future__ import annotations

from pathlib import Path

from .common import file_records


def filed_name(record: dict, path: Path) -> str:
    if not {"protocol", "what", "command", "variants"} <= set(record):
        raise ValueError(f"{path} is not a protocol record (python -m experiments.studies.protocols writes them)")
    empty = [variant["label"] for variant in record["variants"] if not variant["runs"]]
    if empty:
        raise ValueError(f"{path}: variants {empty} have no finished runs yet")
    return f"ssl_{record['protocol'].replace('-', '_')}.json"


def main(argv=None):
    file_records(filed_name, __doc__, argv)


if __name__ == "__main__":
    main()
