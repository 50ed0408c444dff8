"""File a protocol's record for table_ssl: python -m paper_figs.record_ssl results/ssl/pass/record.json ...

Each record.json (written by ``python -m experiments.studies.protocols PROTOCOL``) is checked to hold every
variant's finished runs and copied to paper_figs/results/ssl_PROTOCOL.json (dashes as underscores).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import RESULTS


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, nargs="+")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for path in args.records:
        print(f"filed {file_record(path, args.results)}")


if __name__ == "__main__":
    main()
