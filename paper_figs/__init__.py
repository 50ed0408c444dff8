"""Figures and tables for the paper, made from recorded results only.

    python -m paper_figs                 # every figure and table: paper_figs/results/*.json -> paper_figs/out/
    python -m paper_figs --out DIR       # elsewhere
    python -m paper_figs.fig_code_error  # one of them

Each ``fig_*`` / ``table_*`` module reads JSON from ``paper_figs/results/`` (nothing is measured
and no number is typed in) and writes PNG and/or Markdown to ``paper_figs/out/``; one whose inputs
are missing is skipped with a message. Results are recorded by the benchmarks
(``python -m experiments.bench.quantize`` / ``bench_optim``, copied here) and by the ``record_*``
modules (``python -m paper_figs.record_code_error``). See paper_figs/README.md.
"""
