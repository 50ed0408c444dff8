"""Benchmark block-wise quantization: quantlab's kernels vs the NumPy reference, bitsandbytes and a copy.

    python -m experiments.bench.quantize                  # CPU, N = 2**24, block sizes 64..4096
    python -m experiments.bench.quantize --device cuda    # GPU: quantlab vs bitsandbytes vs torch copy

Elements per second are N / median time. The round trip is one quantize plus one dequantize; it
moves 10 bytes an element (read 4 + write 1, read 1 + write 4), and its time is compared with the
time a memory copy of the same 10 bytes an element takes on the same machine in the same run.
Results are printed and saved as JSON and Markdown under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from quantlab import kernels, reference
from quantlab.codes import dynamic_code
from quantlab.provenance import environment
from quantlab.tables import markdown_table

ROUND_TRIP_BYTES = 10  # per element: quantize reads 4, writes 1; dequantize reads 1, writes 4


def median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up: compilation, page faults, caches
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(n: int, repeats: int, device: str) -> dict:
    """Bytes/s of a float32 copy (read + write counted) with numpy (1 thread) and torch."""
    import torch

    out = {}
    if device == "cpu":
        a = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
        b = np.empty_like(a)
        out["numpy copy"] = 8 * n / median_time(lambda: np.copyto(b, a), repeats)
    ta = torch.randn(n, device=device)
    tb = torch.empty_like(ta)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out[f"torch copy ({torch.get_num_threads()} threads)" if device == "cpu" else "torch copy"] = (
        8 * n / median_time(lambda: tb.copy_(ta), repeats, sync))
    return out


def bitsandbytes_functions():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


def bench_cpu(n: int, block_sizes, repeats: int, reference_repeats: int) -> dict:
    import torch

    code = dynamic_code(signed=True)
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    bnb = bitsandbytes_functions()
    rows = []
    for block_size in block_sizes:
        # quantlab twice: allocating its outputs per call, and writing into preallocated ones (out=).
        # bitsandbytes always allocates (its out= copies a freshly allocated result).
        q_buf = np.empty(n, np.uint8)
        absmax_buf = np.empty(reference.num_blocks(n, block_size), np.float32)
        values_buf = np.empty(n, np.float32)
        impls = {
            "reference (numpy)": (
                lambda: reference.quantize_blockwise(x, code, block_size),
                lambda q, a: reference.dequantize_blockwise(q, a, code, block_size), reference_repeats),
            "quantlab cpu": (
                lambda: kernels.quantize_blockwise(x, code, block_size, backend="cpu"),
                lambda q, a: kernels.dequantize_blockwise(q, a, code, block_size, backend="cpu"), repeats),
            "quantlab cpu, out=": (
                lambda: kernels.quantize_blockwise(x, code, block_size, backend="cpu", out=(q_buf, absmax_buf)),
                lambda q, a: kernels.dequantize_blockwise(q, a, code, block_size, backend="cpu", out=values_buf),
                repeats),
        }
        if bnb is not None:
            tx, tcode = torch.from_numpy(x), torch.from_numpy(code.values.copy())
            impls["bitsandbytes cpu"] = (
                lambda: bnb.quantize_blockwise(tx, code=tcode, blocksize=block_size),
                lambda q, state: bnb.dequantize_blockwise(q, state), repeats)

        for name, (quantize, dequantize, reps) in impls.items():
            try:
                packed = quantize()
            except Exception as error:  # bitsandbytes rejects some block sizes
                print(f"  {name} block {block_size}: skipped ({type(error).__name__}: {error})")
                continue
            tq = median_time(quantize, reps)
            td = median_time(lambda: dequantize(*packed), reps)
            rows.append({"impl": name, "block_size": block_size, "quantize_per_s": n / tq,
                         "dequantize_per_s": n / td, "round_trip_per_s": n / (tq + td)})
            print(f"  block {block_size:5d} {name:24s} quantize {n / tq / 1e6:8.1f} M/s  "
                  f"dequantize {n / td / 1e6:8.1f} M/s  round trip {n / (tq + td) / 1e6:8.1f} M/s", flush=True)
    return {"rows": rows, "copy_bytes_per_s": copy_bandwidth(n, repeats, "cpu")}


def bench_cuda(n: int, block_sizes, repeats: int) -> dict:
    import torch

    code = dynamic_code(signed=True)
    x = torch.randn(n, device="cuda")
    bnb = bitsandbytes_functions()
    tcode = torch.from_numpy(code.values.copy()).cuda()
    rows = []
    sync = torch.cuda.synchronize
    for block_size in block_sizes:
        impls = {"quantlab cuda": (lambda: kernels.quantize_blockwise(x, code, block_size, check_finite=False),
                                   lambda q, a: kernels.dequantize_blockwise(q, a, code, block_size))}
        if bnb is not None:
            impls["bitsandbytes cuda"] = (lambda: bnb.quantize_blockwise(x, code=tcode, blocksize=block_size),
                                          lambda q, state: bnb.dequantize_blockwise(q, state))
        for name, (quantize, dequantize) in impls.items():
            try:
                packed = quantize()
            except Exception as error:
                print(f"  {name} block {block_size}: skipped ({type(error).__name__}: {error})")
                continue
            tq = median_time(quantize, repeats, sync)
            td = median_time(lambda: dequantize(*packed), repeats, sync)
            rows.append({"impl": name, "block_size": block_size, "quantize_per_s": n / tq,
                         "dequantize_per_s": n / td, "round_trip_per_s": n / (tq + td),
                         "quantize_bytes_per_s": 5 * n / tq, "dequantize_bytes_per_s": 5 * n / td})
            print(f"  block {block_size:5d} {name:24s} quantize {5 * n / tq / 1e9:7.1f} GB/s  "
                  f"dequantize {5 * n / td / 1e9:7.1f} GB/s", flush=True)
    return {"rows": rows, "copy_bytes_per_s": copy_bandwidth(n, repeats, "cuda"),
            "gpu": torch.cuda.get_device_name()}


def ratio_table(result: dict, device: str) -> str:
    """quantlab (allocating, and with out=) against bitsandbytes, per block size."""
    by = {(r["impl"], r["block_size"]): r for r in result["rows"]}
    copy_seconds_per_element = ROUND_TRIP_BYTES / max(result["copy_bytes_per_s"].values())

    def ratio(r, other, key):
        return f"{r[key] / other[key]:.1f}x" if other else "-"

    rows = []
    for ours in sorted({impl for impl, _ in by if impl.startswith("quantlab")}):
        for block_size in sorted({b for _, b in by}):
            r = by.get((ours, block_size))
            if r is None:
                continue
            bnb, ref = by.get((f"bitsandbytes {device}", block_size)), by.get(("reference (numpy)", block_size))
            rows.append({**r, "impl": ours, "quantize_vs_bnb": ratio(r, bnb, "quantize_per_s"),
                         "dequantize_vs_bnb": ratio(r, bnb, "dequantize_per_s"),
                         "round_trip_vs_reference": ratio(r, ref, "round_trip_per_s"),
                         "vs_copy": (1 / r["round_trip_per_s"]) / copy_seconds_per_element})
    per_million = "{:.0f}".format
    text = markdown_table(
        rows, ["impl", "block_size", "quantize_per_s", "dequantize_per_s", "round_trip_per_s", "quantize_vs_bnb",
               "dequantize_vs_bnb", "round_trip_vs_reference", "vs_copy"],
        formats={"block_size": str, **{key: (lambda v: per_million(v / 1e6)) for key in
                                       ("quantize_per_s", "dequantize_per_s", "round_trip_per_s")},
                 "vs_copy": ".2f"},
        headers={"impl": "quantlab", "block_size": "block", "quantize_per_s": "quantize M/s",
                 "dequantize_per_s": "dequantize M/s", "round_trip_per_s": "round trip M/s",
                 "quantize_vs_bnb": "quantize vs bnb", "dequantize_vs_bnb": "dequantize vs bnb",
                 "round_trip_vs_reference": "round trip vs reference", "vs_copy": "round-trip time / copy time"},
        align={key: "right" for key in ("quantize_vs_bnb", "dequantize_vs_bnb", "round_trip_vs_reference")})
    copies = ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in result["copy_bytes_per_s"].items())
    return text + f"\n\nMemory copy (read + write bytes counted): {copies}."


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2**24, help="elements (default 2**24)")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=Path("results/bench_quantize"))
    args = parser.parse_args(argv)

    env = environment()
    print("environment:", json.dumps(env))
    if args.device == "cpu":
        result = bench_cpu(args.n, args.block_sizes, args.repeats, args.reference_repeats)
    else:
        result = bench_cuda(args.n, args.block_sizes, args.repeats)
    result.update({"environment": env, "n": args.n, "device": args.device})
    table = ratio_table(result, args.device)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.device}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.device}.md").write_text(
        f"N = {args.n} float32, dynamic signed map; environment: {json.dumps(env)}\n\n{table}\n")
    print(f"saved {args.out / (args.device + '.json')} and .md")
    return result


if __name__ == "__main__":
    main()
