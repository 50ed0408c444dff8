"""python -m paper_figs [--results DIR] [--out DIR] [--only NAME ...]: every figure and table.

A script whose recorded inputs are missing is skipped with a message; one that fails makes the
command exit with status 1 after the others have run.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

from .common import OUT, RESULTS, Skip

# readme last: it gathers what the others wrote
SCRIPTS = ("fig_code_error", "fig_quantize_speed", "fig_optim_speed", "table_optim_speed", "table_ssl", "table_lm",
           "readme")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paper_figs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"folder of recorded JSON (default {RESULTS})")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder for PNG and Markdown (default {OUT})")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, default=SCRIPTS, metavar="NAME",
                        help=f"run only these: {', '.join(SCRIPTS)}")
    args = parser.parse_args(argv)
    failed = []
    for name in args.only:
        module = importlib.import_module(f"{__package__}.{name}")
        try:
            for path in module.make(args.results, args.out):
                print(f"{name}: wrote {path}")
        except Skip as why:
            print(f"{name}: skipped ({why})")
        except Exception:  # report, run the rest, fail at the end
            traceback.print_exc()
            print(f"{name}: FAILED")
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
