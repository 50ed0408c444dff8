"""Record the code-error study behind fig_code_error: python -m paper_figs.record_code_error

Quantization error of the five code families (quantlab.codes.FAMILIES) on the four seeded data
sets of quantlab.analysis (normal, t(2), Adam m, Adam v; 2^18 values each): 8-bit codes at block
sizes 64 .. 4096 and one block per tensor ("by_block"), and 3 .. 8 bits at blocks of 256 and one
block per tensor ("by_bits"). Writes paper_figs/results/code_error.json (about 10 s on 2 cores).
Deterministic: the data are seeded and the quantizer exact, so a re-run changes only "environment".
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import quantlab
from quantlab import analysis, codes

from .common import RESULTS

N = 2**18
BITS_BLOCK_SIZES = (256, analysis.TENSOR)


def record(n: int = N, seed: int = 0) -> dict:
    data = analysis.sample_datasets(n, seed)
    return {
        "description": "relative L2 error and share of non-zero values returned as 0, per data set, code family, "
                       "bit width and block size ('tensor' = one block per tensor); quantlab.analysis.error_table",
        "command": "python -m paper_figs.record_code_error",
        "n": n, "seed": seed, "families": list(codes.FAMILIES), "data": list(data),
        "block_sizes": list(analysis.BLOCK_SIZES), "bits": list(analysis.BITS),
        "by_block": analysis.error_table(data, codes.family_codes(8), analysis.BLOCK_SIZES),
        "by_bits": analysis.bit_sweep(data, analysis.BITS, block_sizes=BITS_BLOCK_SIZES),
        "environment": {"python": platform.python_version(), "numpy": np.__version__,
                        "quantlab": quantlab.__version__, "machine": platform.machine()},
    }


def dumps(result: dict) -> str:
    """JSON with one line per table row, so that a re-recording diffs row by row."""
    parts = []
    for key, value in result.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            rows = ",\n".join("  " + json.dumps(row) for row in value)
            parts.append(f" {json.dumps(key)}: [\n{rows}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder to write code_error.json into")
    parser.add_argument("--n", type=int, default=N, help="values per data set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = record(args.n, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "code_error.json"
    path.write_text(dumps(result))
    print(f"wrote {path} ({len(result['by_block'])} + {len(result['by_bits'])} rows, "
          f"{time.perf_counter() - start:.1f} s)")
    return path


if __name__ == "__main__":
    main()
