"""Shared plumbing of the figure and table scripts: where results and outputs live, loading JSON,
saving figures reproducibly, and the skip-or-make protocol that ``python -m paper_figs`` runs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE / "out"


class Skip(Exception):
    """A figure or table whose recorded inputs are missing: reported, not an error."""


def load(results: Path, name: str, record: str = "") -> dict:
    """``results/name`` as JSON, or Skip naming the file and ``record``, the command that records it."""
    path = Path(results) / name
    if not path.is_file():
        raise Skip(f"{path} is missing" + (f"; record it with `{record}`" if record else ""))
    return json.loads(path.read_text())


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """PNG without a software version in its metadata, so regenerating unchanged data changes no byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Software": None})
    fig.clear()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def save_text(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")
    return path


def environment_line(env: dict | None) -> str:
    if not env:
        return ""
    return "Recorded with " + ", ".join(f"{k} {v}" for k, v in env.items()) + "."


def run_one(make, argv=None) -> int:
    """``python -m paper_figs.<module>``: run one script's ``make(results, out)``."""
    parser = argparse.ArgumentParser(description=make.__module__)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of recorded JSON")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for PNG and Markdown")
    args = parser.parse_args(argv)
    try:
        for path in make(args.results, args.out):
            print(f"wrote {path}")
    except Skip as why:
        print(f"skipped {make.__module__}: {why}")
    return 0


def file_records(filed_name, description: str, argv=None) -> None:
    """``python -m paper_figs.record_*``: each record (JSON) named on the command line copied into the
    results folder as ``filed_name(record, path)``, which checks it first (raising ValueError)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, nargs="+")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for path in args.records:
        record = json.loads(path.read_text())
        target = args.results / filed_name(record, path)
        target.write_text(json.dumps(record, indent=2) + "\n")
        print(f"filed {target}")
