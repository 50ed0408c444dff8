"""Figure: block-wise quantization throughput on the CPU against block size, per implementation.

Reads results/bench_quantize_cpu.json (python -m experiments.bench.quantize, its cpu.json copied
here); writes out/fig_quantize_speed.png and out/fig_quantize_speed.md.
"""
from __future__ import annotations

from pathlib import Path

from quantlab.tables import markdown_table

from .common import Skip, environment_line, load, pyplot, run_one, save_figure, save_text

RECORD = "python -m experiments.bench.quantize --out results/bench_quantize; cp results/bench_quantize/cpu.json " \
         "paper_figs/results/bench_quantize_cpu.json"
MEASURES = (("quantize_per_s", "quantize"), ("dequantize_per_s", "dequantize"), ("round_trip_per_s", "round trip"))


def make(results: Path, out: Path) -> list[Path]:
    result = load(results, "bench_quantize_cpu.json", RECORD)
    rows = result.get("rows") or []
    if not rows:
        raise Skip("bench_quantize_cpu.json holds no rows")
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    block_sizes = sorted({r["block_size"] for r in rows})
    by = {(r["impl"], r["block_size"]): r for r in rows}
    plt = pyplot()
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(15, 4), sharey=True)
    copy = result.get("copy_bytes_per_s", {})
    for ax, (key, title) in zip(axes, MEASURES):
        for impl in impls:
            xs = [b for b in block_sizes if (impl, b) in by]
            ax.plot(xs, [by[impl, b][key] / 1e6 for b in xs], marker="o", label=impl)
        for name, bytes_per_s in copy.items():  # a float32 copy moves 8 bytes per element
            ax.axhline(bytes_per_s / 8 / 1e6, color="grey", linestyle=":", linewidth=1)
        ax.set(title=title, xscale="log", yscale="log", xlabel="block size")
        ax.set_xticks(block_sizes, [str(b) for b in block_sizes])
        ax.minorticks_off()
    axes[0].set_ylabel("million values / s")
    axes[0].legend(fontsize=8)
    env = result.get("environment", {})
    fig.suptitle(f"{result.get('n', 0):,} float32 values, dynamic signed map, {env.get('cpu', 'CPU')} "
                 f"({env.get('numba_threads', '?')} threads); dotted: float32 copy", fontsize=10)
    fig.tight_layout()
    png = save_figure(fig, Path(out) / "fig_quantize_speed.png")

    table = [{"implementation": impl, **{str(b): by[impl, b]["round_trip_per_s"] / 1e6 for b in block_sizes
                                         if (impl, b) in by}} for impl in impls]
    lines = ["Round-trip (quantize + dequantize) throughput, million values per second.", "",
             markdown_table(table, ["implementation", *map(str, block_sizes)],
                            formats=dict.fromkeys(map(str, block_sizes), ".0f"),
                            align=dict.fromkeys(map(str, block_sizes), "right"))]
    lines += ["", "Source: paper_figs/results/bench_quantize_cpu.json. " + environment_line(env)]
    return [png, save_text("\n".join(lines), Path(out) / "fig_quantize_speed.md")]


if __name__ == "__main__":
    run_one(make)
