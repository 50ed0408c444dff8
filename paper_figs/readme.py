"""The results pages: paper_figs/README.md (every rendered table, with its figure) and the headline
table of the repository's README, both made from the recorded results so they cannot drift.

``python -m paper_figs`` runs this last: with the default --out it rewrites paper_figs/README.md and
the block of ../README.md between HEADLINE_BEGIN and HEADLINE_END; with another --out it writes
OUT/README.md only. tests/paper_figs/test_readme.py checks that the committed pages are current.
"""
from __future__ import annotations

from pathlib import Path

from quantlab.tables import markdown_table

from .common import HERE, OUT, Skip, run_one, save_text
from .optim_results import load_optim

REPOSITORY_README = HERE.parent / "README.md"
HEADLINE_BEGIN = "<!-- headline: rendered by `python -m paper_figs` from paper_figs/results; do not edit -->"
HEADLINE_END = "<!-- end of headline -->"
HEADLINE_CASE = "ResNet-18"
HEADLINE_OPTIMIZERS = ("torch Adam (fused)", "torch Adam (default)", "quantlab Adam 32-bit", "quantlab Adam 8-bit",
                       "bitsandbytes Adam8bit", "torchao AdamW8bit")

INTRO = """\
# paper_figs: figures and tables from recorded results

```bash
python -m paper_figs                      # all of them: results/*.json -> out/, and this page
python -m paper_figs --out /tmp/figs      # elsewhere;  --only fig_code_error table_optim_speed
python -m paper_figs.fig_code_error       # one of them (same --results / --out options)
```

Every script reads JSON from `paper_figs/results/` and writes to `paper_figs/out/`; nothing is
measured and no number is typed into a script. A script whose input is missing is skipped with a
message naming the command that records it (the command still succeeds); a script that fails makes
`python -m paper_figs` exit with status 1 after the others have run. This page is rendered by the
same command from the same files (`paper_figs/readme.py`); do not edit it by hand.

{scripts}

Absolute times depend on the machine that recorded them (named under each table); compare the
ratios measured in the same run. The notebooks (`notebooks/`) explore the same questions
interactively on smaller data; `code_error.json` is the full-size version of notebook 1's study,
made by the same `quantlab.analysis` functions.
"""

# what each script reads, writes, and the command that records its input
SCRIPT_ROWS = (
    {"script": "`fig_code_error`", "reads": "`code_error.json`", "writes": "`fig_code_error.png`, `.md`",
     "recorded by": "`python -m paper_figs.record_code_error` (~10 s)"},
    {"script": "`fig_quantize_speed`", "reads": "`bench_quantize_cpu.json`",
     "writes": "`fig_quantize_speed.png`, `.md`",
     "recorded by": "`python -m experiments.bench.quantize`, its `cpu.json` copied"},
    {"script": "`fig_optim_speed`", "reads": "`bench_optim_single.json`, `bench_optim_models.json`",
     "writes": "`fig_optim_speed.png`", "recorded by": "`python -m experiments.bench.optim`, its JSON copied"},
    {"script": "`table_optim_speed`", "reads": "the same", "writes": "`table_optim_speed.md`",
     "recorded by": "the same"},
    {"script": "`table_ssl`", "reads": "`ssl_*.json` (optional)", "writes": "`table_ssl.md`",
     "recorded by": "`make ssl-protocols` (`python -m paper_figs.record_ssl`); skipped until one exists"},
    {"script": "`table_lm`", "reads": "`lm_*.json`", "writes": "`table_lm_STUDY.md`, `fig_lm_STUDY.png`",
     "recorded by": "`make lm-studies` (`python -m paper_figs.record_lm`; about an hour)"},
)

# (title, table, figure) in the order the page shows them; a missing file is left out
SECTIONS = (
    ("Quantization error of the codes", "fig_code_error.md", "fig_code_error.png"),
    ("Block-wise quantization speed (CPU)", "fig_quantize_speed.md", "fig_quantize_speed.png"),
    ("One optimizer step (CPU)", "table_optim_speed.md", "fig_optim_speed.png"),
    ("Self-supervised training with 8-bit and 32-bit optimizer state", "table_ssl.md", None),
    ("Language model: the learning rate of the stability study", "table_lm_lr_sweep.md", "fig_lm_lr_sweep.png"),
    ("Language model: stability of 8-bit states (the paper's Table 3)", "table_lm_stability.md",
     "fig_lm_stability.png"),
    ("Language model: the same at a 4x smaller learning rate", "table_lm_stability_moderate_lr.md",
     "fig_lm_stability_moderate_lr.png"),
    ("Language model: 8-bit vs 32-bit states (a Table 1 row)", "table_lm_table1.md", "fig_lm_table1.png"),
    ("Language model: 4-bit AdamW states (Li et al. 2023)", "table_lm_four_bit.md", "fig_lm_four_bit.png"),
    ("Language model: 2- to 8-bit states by code", "table_lm_state_bits.md", "fig_lm_state_bits_by_code.png"),
    ("Language model: 2- to 8-bit states, validation curves", None, "fig_lm_state_bits.png"),
)


def results_page(out: Path, links: str) -> str:
    """INTRO and, per section, the rendered table of ``out`` and a link to its figure (as ``links`` +
    file name). Headings inside a rendered table move one level down, under the section's."""
    scripts = markdown_table(SCRIPT_ROWS, ["script", "reads", "writes", "recorded by"],
                             headers={"reads": "reads (results/)", "writes": "writes (out/)"})
    parts = [INTRO.format(scripts=scripts)]
    for title, table, figure in SECTIONS:
        text_path = Path(out) / table if table else None
        figure_path = Path(out) / figure if figure else None
        if not (text_path and text_path.is_file()) and not (figure_path and figure_path.is_file()):
            continue
        parts.append(f"## {title}\n")
        if figure_path and figure_path.is_file():
            parts.append(f"![{title}]({links}{figure})\n")
        if text_path and text_path.is_file():
            text = text_path.read_text().strip("\n")
            parts.append("\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()) + "\n")
    return "\n".join(parts)


def headline(results: Path) -> str:
    """The README's table: one Adam step on ResNet-18, quantlab against torch and the 8-bit libraries
    measured in the same run."""
    rows, _, environments = load_optim(results)
    by = {r["optimizer"]: r for r in rows if r["case"] == HEADLINE_CASE}
    fused, bnb = by.get("torch Adam (fused)"), by.get("bitsandbytes Adam8bit")
    if fused is None or bnb is None:
        raise Skip(f"the optimizer benchmark holds no {HEADLINE_CASE} run of torch's fused Adam and bitsandbytes")
    table = [{**by[name], "vs_fused": fused["ms_per_step"] / by[name]["ms_per_step"],
              "vs_bnb": bnb["ms_per_step"] / by[name]["ms_per_step"]} for name in HEADLINE_OPTIMIZERS if name in by]
    env = environments[0]
    machine = f"{env.get('cpu', 'unnamed CPU')}, {env.get('numba_threads', env.get('threads', '?'))} threads"
    text = markdown_table(table, ["optimizer", "state_bytes_per_param", "vs_fused", "vs_bnb"],
                          formats={"state_bytes_per_param": ".2f", "vs_fused": ".2f", "vs_bnb": ".1f"},
                          headers={"state_bytes_per_param": "state bytes / parameter",
                                   "vs_fused": "speed vs torch fused Adam", "vs_bnb": "speed vs bitsandbytes"})
    return (f"One Adam step on ResNet-18 ({fused['params'] / 1e6:.1f} M parameters) on the CPU ({machine}), "
            f"speeds relative to the others in the same run (above 1 = faster):\n\n{text}")


def with_headline(readme: str, table: str) -> str:
    """``readme`` with the text between the headline markers replaced by ``table``."""
    begin, end = readme.find(HEADLINE_BEGIN), readme.find(HEADLINE_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md lacks the headline markers {HEADLINE_BEGIN!r} ... {HEADLINE_END!r}")
    return readme[:begin + len(HEADLINE_BEGIN)] + "\n" + table + "\n" + readme[end:]


def make(results: Path, out: Path) -> list[Path]:
    if Path(out).resolve() != OUT.resolve():
        return [save_text(results_page(out, ""), Path(out) / "README.md")]
    written = [save_text(results_page(out, "out/"), HERE / "README.md")]
    try:
        table = headline(results)
    except Skip as why:
        print(f"note: README headline left as it is ({why})")
        return written
    REPOSITORY_README.write_text(with_headline(REPOSITORY_README.read_text(), table))
    return written + [REPOSITORY_README]


if __name__ == "__main__":
    run_one(make)
