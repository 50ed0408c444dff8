"""Table: one optimizer step against torch, bitsandbytes and torchao: time, state and peak memory.

Reads results/bench_optim_single.json and bench_optim_models.json (either may be missing); writes
out/table_optim_speed.md.
"""
from __future__ import annotations

from pathlib import Path

from .common import environment_line, run_one, save_text
from .optim_results import cases, load_optim


def make(results: Path, out: Path) -> list[Path]:
    rows, checks, environments = load_optim(results)
    lines = ["| parameters | optimizer | ms / step | vs torch fused | vs bitsandbytes 8-bit | state B/param "
             "| peak extra B/param during step |", "|---|---|---:|---:|---:|---:|---:|"]
    for case in cases(rows):
        by = {r["optimizer"]: r for r in rows if r["case"] == case}
        fused, bnb = by.get("torch Adam (fused)"), by.get("bitsandbytes Adam8bit")
        for name, r in by.items():
            vs_fused = f"{fused['ms_per_step'] / r['ms_per_step']:.2f}x" if fused else "-"
            vs_bnb = f"{bnb['ms_per_step'] / r['ms_per_step']:.1f}x" if bnb else "-"
            lines.append(f"| {case} ({r['params'] / 1e6:.1f} M) | {name} | {r['ms_per_step']:.1f} | {vs_fused} | "
                         f"{vs_bnb} | {r['state_bytes_per_param']:.2f} | {r['peak_extra_bytes_per_param']:.2f} |")
    lines += ["", "'vs' columns: how many times faster than that optimizer (above 1 = faster)."]
    if checks:
        lines += ["", "Non-finite gradient check per step (ms): " + "; ".join(
            f"{case}: quantlab {c['quantlab_check_ms']:.2f}, torch.isfinite().all() {c['torch_isfinite_all_ms']:.2f}"
            for case, c in checks.items())]
    lines += ["", "Source: paper_figs/results/bench_optim_*.json. "
              + " ".join(environment_line(env) for env in environments[:1])]
    return [save_text("\n".join(lines), Path(out) / "table_optim_speed.md")]


if __name__ == "__main__":
    run_one(make)
