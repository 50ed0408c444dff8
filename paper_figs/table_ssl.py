"""Table: the SSL experiments' results, once recorded.

Reads every results/ssl_*.json; skipped (with a message) while there is none. A protocol's record
(``python -m experiments.studies.protocols``, filed by ``python -m paper_figs.record_ssl``: "variants", each
a sweep's rows and command) is one table with the variant beside the method; a sweep's record
(``python -m experiments.studies.sweep``: "rows" of medians and a "command") is shown as the sweep prints
it, with the command that reproduces it; any other file is either ``{"rows": [{column: value, ...},
...], ...}`` or one flat ``{column: value}`` row, whose scalar columns are tabulated in first-seen
order. One section per file, in out/table_ssl.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from experiments.studies import sweep
from quantlab.tables import markdown_table

from .common import Skip, run_one, save_text


def _rows(result) -> list[dict]:
    rows = result.get("rows") if isinstance(result, dict) and "rows" in result else [result]
    return [r for r in rows if isinstance(r, dict)]


def protocol_section(name: str, record: dict) -> str:
    """A protocol's record (experiments/studies/protocols.py): its variants' rows in one table, the variant
    named beside the method; then the command of each variant's sweep."""
    rows = [{**row, "method": f"{row['method']} ({variant['label']})" if len(record["variants"]) > 1 else row["method"]}
            for variant in record["variants"] for row in variant["rows"]]
    commands = "\n".join(f"- {variant['label']}: `{variant['command']}`" for variant in record["variants"])
    return (f"### {name}\n\n{record['what']}\n\n{sweep.markdown(rows)}{untrained_table(record.get('untrained', []))}"
            f"\nReproduce: `{record['command']}`, which runs these sweeps:\n\n{commands}")


def untrained_table(rows: list[dict]) -> str:
    """The backbones as initialised, before any pretraining: what the runs have to beat."""
    if not rows:
        return ""
    keys = sweep.metric_keys(rows)
    cells = [{**row, **{k: f"{100 * row[k]:.1f} ± {100 * row[k + '_spread'] / 2:.1f}" for k in keys}} for row in rows]
    table = markdown_table(cells, ["backbone", "seeds", *keys], align=dict.fromkeys(keys, "right"),
                           headers={"backbone": "untrained backbone", **{k: sweep.metric_header(k) for k in keys}})
    return "\nThe same backbones untrained (initialised as the runs; medians over seeds):\n\n" + table + "\n"


def make(results: Path, out: Path) -> list[Path]:
    paths = sorted(Path(results).glob("ssl_*.json"))
    if not paths:
        raise Skip(f"no {Path(results) / 'ssl_*.json'} yet (the SSL experiments record them)")
    sections = []
    for path in paths:
        result = json.loads(path.read_text())
        if isinstance(result, dict) and "variants" in result:
            sections.append(protocol_section(path.name, result))
            continue
        if isinstance(result, dict) and "command" in result and "runs" in result:
            untrained = result.get("untrained_backbone")
            baseline = "" if untrained is None else (
                f"\nUntrained backbone ({untrained['what']}): k-NN {100 * untrained['knn_accuracy_median']:.1f} %, "
                f"linear probe {100 * untrained['linear_accuracy_median']:.1f} % (medians).\n")
            sections.append(f"### {path.name}\n\n{result.get('what', '')}\n\n"
                            f"{sweep.markdown(result['rows'])}{baseline}\n"
                            f"Reproduce: `{result['command']}`")
            continue
        rows = _rows(result)
        columns = [c for c in dict.fromkeys(k for r in rows for k in r)
                   if all(isinstance(r.get(c), (str, int, float, bool, type(None))) for r in rows)]
        if not rows or not columns:
            sections.append(f"### {path.name}\n\n(no tabular rows)")
            continue
        four_digits = dict.fromkeys(columns, lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
        sections.append(f"### {path.name}\n\n" + markdown_table(rows, columns, formats=four_digits))
    return [save_text("\n\n".join(sections), Path(out) / "table_ssl.md")]


if __name__ == "__main__":
    run_one(make)
