"""Quantization-error report on built-in data: which 8-bit code and block size keep optimizer-like
tensors accurate?

    python -m experiments.studies.quantization_report --out results/quantization_report

Data are generated here with fixed seeds (nothing is downloaded): a normal tensor, a heavy-tailed
one (Student t, 2 degrees of freedom), and Adam's two moment estimates after 100 steps on
heavy-tailed gradients with per-parameter scales spread over four orders of magnitude. Each is
quantized block-wise with each code by the reference quantizer, at block sizes 64 .. 4096 and
one block for the whole tensor (plain tensor-wise dynamic quantization). Saves a Markdown table,
CSV, JSON and a figure.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from quantlab import dynamic_code, fp8_code, linear_code, metrics, quantile_code
from quantlab.analysis import adam_moments  # the Adam-state generator, shared with the notebooks
from quantlab.tables import markdown_table

N = 2**18
BLOCK_SIZES = [64, 256, 1024, 2048, 4096, N]


def datasets(n: int) -> dict:
    rng = np.random.default_rng(0)
    m, v = adam_moments(n)
    return {
        "normal": rng.standard_normal(n).astype(np.float32),
        "heavy-tailed t(2)": rng.standard_t(2, n).astype(np.float32),
        "Adam m": m,
        "Adam v": v,
    }


def codes_for(x: np.ndarray) -> list:
    """Signed codes for signed data, unsigned ones for non-negative data (Adam's v)."""
    if np.all(x >= 0):
        return [dynamic_code(signed=False), linear_code(8, signed=False), quantile_code(x, 8)]
    return [dynamic_code(signed=True), dynamic_code(signed=True, symmetric=True), linear_code(8, signed=True),
            fp8_code("e4m3"), quantile_code(x, 8)]


def run(n: int) -> list[dict]:
    rows = []
    for name, x in datasets(n).items():
        print(f"{name}: {x.size} values", flush=True)
        for code in codes_for(x):
            for block_size in BLOCK_SIZES:
                summary = metrics.blockwise_error_summary(x, code, min(block_size, x.size))
                summary.update(data=name, block_size="tensor" if block_size >= x.size else block_size)
                rows.append(summary)
    return rows


def report_table(rows: list[dict]) -> str:
    columns = ["data", "code", "block_size", "relative_error", "zero_rounding_fraction", "codes_used"]
    return markdown_table(rows, columns,
                          headers={"block_size": "block", "relative_error": "relative error",
                                   "zero_rounding_fraction": "non-zero rounded to 0", "codes_used": "codes used"},
                          formats={"relative_error": ".2e", "zero_rounding_fraction": ".2%"},
                          align={"block_size": "right"})


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), sharey=True)
    labels = [str(b) if b != N else "tensor" for b in BLOCK_SIZES]
    for ax, name in zip(axes, names):
        for code in dict.fromkeys(r["code"] for r in rows if r["data"] == name):
            errors = [r["relative_error"] for r in rows if r["data"] == name and r["code"] == code]
            ax.plot(range(len(errors)), errors, marker="o", label=code)
        ax.set_xticks(range(len(labels)), labels, rotation=45)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("block size")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("relative L2 error")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/quantization_report"))
    parser.add_argument("--n", type=int, default=N, help="elements per tensor")
    args = parser.parse_args(argv)
    rows = run(args.n)
    table = report_table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(table + "\n")
    (args.out / "report.json").write_text(json.dumps(rows, indent=2))
    with open(args.out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "relative_error.png")
    print(f"saved {args.out}/report.md, report.csv, report.json and relative_error.png")
    return rows


if __name__ == "__main__":
    main()
