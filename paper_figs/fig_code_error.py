"""Figure: quantization error of each code family against block size (8 bits) and bit width (blocks of 256).

Reads results/code_error.json (python -m paper_figs.record_code_error); writes out/fig_code_error.png
and out/fig_code_error.md (8-bit error and zero-rounding at blocks of 256 and tensor-wise).
"""
from __future__ import annotations

from pathlib import Path

from quantlab.tables import markdown_table

from .common import Skip, environment_line, load, pyplot, run_one, save_figure, save_text

RECORD = "python -m paper_figs.record_code_error"


def _select(rows, **where):
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def make(results: Path, out: Path) -> list[Path]:
    result = load(results, "code_error.json", RECORD)
    by_block, by_bits = result["by_block"], result["by_bits"]
    if not by_block or not by_bits:
        raise Skip("code_error.json holds no rows")
    plt = pyplot()
    names, families = result["data"], result["families"]
    labels = [str(b) for b in result["block_sizes"]]
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 7), sharey="row")
    for column, name in enumerate(names):
        top, bottom = axes[0, column], axes[1, column]
        for i, family in enumerate(families):
            style = dict(marker="o", markersize=4, color=f"C{i}", label=family)
            rows = _select(by_block, data=name, code=family)
            if rows:
                top.plot([str(r["block_size"]) for r in rows], [r["relative_error"] for r in rows], **style)
            rows = _select(by_bits, data=name, code=family, block_size=256)
            if rows:
                bottom.plot([r["bits"] for r in rows], [r["relative_error"] for r in rows], **style)
        top.set(title=name, xlabel="block size (8-bit codes)", yscale="log")
        top.set_xticks(range(len(labels)), labels, rotation=45)
        bottom.set(xlabel="bits (blocks of 256)", yscale="log")
    axes[0, 0].set_ylabel("relative L2 error")
    axes[1, 0].set_ylabel("relative L2 error")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Quantization error, {result['n']:,} values per data set", fontsize=11)
    fig.tight_layout()
    png = save_figure(fig, Path(out) / "fig_code_error.png")

    lines = [f"Relative L2 error of 8-bit codes (share of non-zero values returned as 0), "
             f"{result['n']:,} values per data set; blocks of 256 / one block per tensor.", ""]
    table = []
    for name in names:
        for family in families:
            cells = {r["block_size"]: r for r in _select(by_block, data=name, code=family)}
            if 256 in cells and "tensor" in cells:
                table.append({"data": name, "code": family, "code name": cells[256]["code_name"],
                              **{label: f"{cells[b]['relative_error']:.2e} ({cells[b]['zero_rounding_fraction']:.1%})"
                                 for label, b in (("blocks of 256", 256), ("tensor-wise", "tensor"))}})
    lines.append(markdown_table(table, ["data", "code", "code name", "blocks of 256", "tensor-wise"],
                                align={"blocks of 256": "right", "tensor-wise": "right"}))
    lines += ["", f"Source: paper_figs/results/code_error.json (`{RECORD}`). "
              + environment_line(result.get("environment"))]
    return [png, save_text("\n".join(lines), Path(out) / "fig_code_error.md")]


if __name__ == "__main__":
    run_one(make)
