"""Benchmark one optimizer step: quantlab Adam (8-bit and 32-bit state) vs torch, bitsandbytes, torchao.

    python -m experiments.bench.optim                    # one 2**24 tensor, ResNet-18, small ViT
    python -m experiments.bench.optim --cases single --no-torchao
    python -m experiments.bench.optim --device cuda --dtype bfloat16    # on a GPU
    python -m experiments.bench.optim --low-bit --cases single matrix resnet18 vit   # + 4-bit states

``--low-bit`` adds the 4-bit rows (Li, Chen and Zhu 2023): quantlab AdamW with ``**qo.FOUR_BIT``
(m block-wise, v rank-1 with the zero-free linear code), quantlab AdamW with 4-bit block-wise
dynamic codes (blocks of 128), and torchao's AdamW4bit. The ``matrix`` case (one 4096 x 4096
tensor, 2**24 elements) is the one-tensor case in a shape that rank-1 normalisation applies to: a
1-D tensor, like ``single``'s, keeps blocks of 128 under FOUR_BIT.

For each parameter set (random gradients of 1e-2 scale) and optimizer: ms per step (median after
warm-up steps, the optimizers' steps timed in turn), state bytes per parameter, and the peak extra
resident memory during a step over the memory before it (sampled every 0.2 ms from
/proc/self/statm by a background thread, over two more steps after the timed ones; the states
already exist by then). Ratios are printed against
torch's fused fp32 Adam and against bitsandbytes' Adam8bit measured in the same run, and against
the step's memory speed: the bytes it must move at the in-place read + write bandwidth measured in
the same run.
On CUDA the steps are timed between synchronisations and the peak extra memory is torch's
max_memory_allocated over the memory before the steps. Saves JSON and Markdown under --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import quantlab.optim as qo
from quantlab.provenance import environment
from quantlab.tables import markdown_table

PAGE = os.sysconf("SC_PAGE_SIZE")
MEMORY_STEPS = 2  # steps over which the peak extra memory is sampled, after the timed ones


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Peak resident memory while the block runs, sampled by a thread."""

    def __enter__(self):
        self.start = self.peak = resident_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def parameter_sets(cases, single_size: int, device="cpu", dtype=torch.float32):
    import torchvision

    def on_device(make_module):
        return lambda: list(make_module().to(device=device, dtype=dtype).parameters())

    sets = {}
    if "single" in cases:
        sets["one tensor"] = lambda: [torch.nn.Parameter(torch.randn(single_size, device=device, dtype=dtype))]
    if "matrix" in cases:
        side = 2 ** (max(single_size.bit_length() - 1, 0) // 2)  # 4096 for 2**24
        sets[f"one matrix ({side}x{side})"] = lambda: [
            torch.nn.Parameter(torch.randn(side, side, device=device, dtype=dtype))]
    if "resnet18" in cases:
        sets["ResNet-18"] = on_device(torchvision.models.resnet18)
    if "vit" in cases:
        sets["ViT (6x384, patch 4, 32px)"] = on_device(lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=4, num_layers=6, num_heads=6, hidden_dim=384, mlp_dim=1536))
    return sets


# The bytes a step must move per parameter at least, for the roofline: Adam reads the parameter and
# the gradient and writes the parameter (3 elements of their dtype), reads and writes two states
# (float32: 16 bytes; 8-bit: a byte each way plus a float32 absmax a block of 256 each way);
# quantlab's steps read the gradients once more for the non-finite check.
# 4-bit states: half a byte each way, plus a float32 scale a block of 128 each way (block-wise), or,
# under rank-1 normalisation, a float32 maximum a row and a column: 4 * (rows + cols) bytes over
# rows * cols elements, under 0.1 % of a byte at 4096 x 4096 and left out (the bound stays a lower
# bound). quantlab's rank-1 step makes two passes (the first computes the new maxima; it reads the
# parameter, the gradient and both states once more): it moves ~1.5x this minimum.
_EIGHT_BIT_STATES = 2 * 2 * (1 + 4 / 256)
_FOUR_BIT_BLOCK_128 = 2 * (0.5 + 4 / 128)  # one state, read and written
_FOUR_BIT_RANK1 = 2 * 0.5
STATE_BYTES_MOVED = {"torch Adam (default)": 16, "torch Adam (foreach)": 16, "torch Adam (fused)": 16,
                     "quantlab Adam 8-bit": _EIGHT_BIT_STATES, "quantlab Adam 32-bit": 16,
                     "bitsandbytes Adam8bit": _EIGHT_BIT_STATES, "torchao AdamW8bit": _EIGHT_BIT_STATES,
                     "quantlab AdamW 4-bit (rank-1, zero-free v)": _FOUR_BIT_BLOCK_128 + _FOUR_BIT_RANK1,
                     "quantlab AdamW 4-bit block-wise": 2 * _FOUR_BIT_BLOCK_128,
                     "torchao AdamW4bit": 2 * _FOUR_BIT_BLOCK_128}


def bytes_moved_per_param(optimizer: str, element_size: int) -> float:
    gradient_reads = 2 if optimizer.startswith("quantlab") else 1
    return (2 + gradient_reads) * element_size + STATE_BYTES_MOVED[optimizer]


def memory_bandwidth(device: str, n: int = 2**28, repeats: int = 7) -> float:
    """Bytes a second read and written by an in-place torch multiply of n float32 elements (1 GiB,
    more than this VM's 480 MiB last-level cache: at 64 MiB it measured the cache, 88 GB/s), at the
    fastest of the repeats. In place, as an optimizer step is: a copy into another buffer also reads
    the destination before writing it and measured half as much."""
    x = torch.randn(n, device=device)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        x.mul_(1.0)
        synchronize()
        times.append(time.perf_counter() - start)
    return 2 * 4 * n / min(times)


def optimizers(include_torchao: bool, low_bit: bool = False):
    """{name: params -> optimizer}. With ``low_bit``, the 4-bit rows too; AdamW's, like torchao's,
    without weight decay, so that every row computes Adam's update."""
    from quantlab.codes import dynamic_code

    makers = {
        "torch Adam (default)": lambda p: torch.optim.Adam(p, foreach=False),
        "torch Adam (foreach)": lambda p: torch.optim.Adam(p, foreach=True),
        "torch Adam (fused)": lambda p: torch.optim.Adam(p, fused=True),
        "quantlab Adam 8-bit": lambda p: qo.Adam(p),
        "quantlab Adam 32-bit": lambda p: qo.Adam(p, state_bits=32),
    }
    if low_bit:
        makers["quantlab AdamW 4-bit (rank-1, zero-free v)"] = lambda p: qo.AdamW(p, weight_decay=0.0, **qo.FOUR_BIT)
        makers["quantlab AdamW 4-bit block-wise"] = lambda p: qo.AdamW(
            p, weight_decay=0.0, state_bits=4, block_size=128, signed_code=dynamic_code(True, 4),
            unsigned_code=dynamic_code(False, 4))
    try:
        import bitsandbytes as bnb

        makers["bitsandbytes Adam8bit"] = lambda p: bnb.optim.Adam8bit(p)
    except ImportError:
        pass
    if include_torchao:
        try:
            from torchao.optim import AdamW8bit

            makers["torchao AdamW8bit"] = lambda p: AdamW8bit(p, weight_decay=0.0)
        except ImportError:
            pass
        if low_bit:
            try:
                from torchao.optim import AdamW4bit

                makers["torchao AdamW4bit"] = lambda p: AdamW4bit(p, weight_decay=0.0)
            except ImportError:
                pass
    return makers


class PeakCudaMemory:
    """Peak CUDA memory torch allocated while the block runs."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


def measure(make_params, makers: dict, steps: int, warmup: int) -> dict:
    """{optimizer name: result} for one parameter set. Every optimizer gets its own copy of the
    parameters, and the timed steps go round-robin, one step of each in turn: on a shared VM whose
    speed drifts (2x within an hour here), every optimizer then sees the same drift, and the ratios
    of one run stay fair."""
    setups = {}
    for name, make_optimizer in makers.items():
        torch.manual_seed(0)
        params = make_params()
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        optimizer = make_optimizer(params)
        synchronize = torch.cuda.synchronize if params[0].is_cuda else (lambda: None)
        start = time.perf_counter()
        optimizer.step()  # creates the states (and compiles, for torchao and for the CUDA kernels)
        synchronize()
        first_step = time.perf_counter() - start
        for _ in range(warmup - 1):
            optimizer.step()
        setups[name] = (params, optimizer, synchronize, first_step)
    times = {name: [] for name in setups}
    for _ in range(steps):
        for name, (params, optimizer, synchronize, _) in setups.items():
            synchronize()
            start = time.perf_counter()
            optimizer.step()
            synchronize()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, (params, optimizer, synchronize, first_step) in setups.items():
        # memory in steps of their own: the sampling thread takes a share of a 2-core CPU, and
        # timed steps beside it ran 10-40 % slower (the parallel kernels most)
        with (PeakCudaMemory() if params[0].is_cuda else PeakMemory()) as memory:
            for _ in range(MEMORY_STEPS):
                optimizer.step()
        n = sum(p.numel() for p in params)
        results[name] = {"ms_per_step": 1e3 * float(np.median(times[name])), "first_step_s": first_step,
                         "state_bytes_per_param": qo.state_bytes(optimizer) / n,
                         "peak_extra_bytes_per_param": (memory.peak - memory.start) / n, "params": n}
    del setups
    gc.collect()
    return results


def nonfinite_check_cost(make_params, repeats: int) -> dict:
    """ms of quantlab's gradient check (one integer-max pass) vs torch.isfinite(g).all() per step."""
    from quantlab.optim.bridge import gradients_finite

    params = make_params()
    for p in params:
        p.grad = torch.randn_like(p)

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))

    return {"quantlab_check_ms": timed(lambda: gradients_finite(params)),
            "torch_isfinite_all_ms": timed(lambda: all(bool(torch.isfinite(p.grad).all()) for p in params))}


def table(rows) -> str:
    """Per case, each optimizer's step time, its speed relative to torch's fused Adam and to
    bitsandbytes' Adam8bit measured in the same run, and its memory."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["optimizer"]: r for r in rows if r["case"] == case}
        fused, bnb = by.get("torch Adam (fused)"), by.get("bitsandbytes Adam8bit")
        for name, r in by.items():
            roofline = r.get("roofline_ms")
            lines.append({**r, "parameters": f"{case} ({r['params'] / 1e6:.1f} M)",
                          "vs_fused": f"{fused['ms_per_step'] / r['ms_per_step']:.2f}x" if fused else "-",
                          "vs_bnb": f"{bnb['ms_per_step'] / r['ms_per_step']:.1f}x" if bnb else "-",
                          "of_roofline": f"{r['ms_per_step'] / roofline:.1f}x" if roofline else "-"})
    roofline = ["roofline_ms", "of_roofline"] if any("roofline_ms" in r for r in rows) else []  # older records
    text = markdown_table(
        lines, ["parameters", "optimizer", "ms_per_step", "vs_fused", "vs_bnb", *roofline,
                "state_bytes_per_param", "peak_extra_bytes_per_param"],
        formats={"ms_per_step": ".1f", "state_bytes_per_param": ".2f", "peak_extra_bytes_per_param": ".2f",
                 **({"roofline_ms": ".1f"} if roofline else {})},
        headers={"ms_per_step": "ms / step", "vs_fused": "vs torch fused", "vs_bnb": "vs bitsandbytes 8-bit",
                 "state_bytes_per_param": "state B/param",
                 "peak_extra_bytes_per_param": "peak extra B/param during step",
                 **({"roofline_ms": "memory-speed ms", "of_roofline": "x memory speed"} if roofline else {})},
        align={"vs_fused": "right", "vs_bnb": "right", **({"of_roofline": "right"} if roofline else {})})
    text += "\n\n'vs' columns: how many times faster than that optimizer (above 1 = faster)."
    if roofline:
        text += (" Memory speed: the bytes the step must move (bytes_moved_per_param) at the in-place memory "
                 "bandwidth measured in the same run; 'x memory speed' is the step's time over that.")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["single", "resnet18", "vit"],
                        choices=["single", "matrix", "resnet18", "vit"],
                        help="matrix: one square tensor, the largest of side 2**k with side**2 <= --single-size "
                             "(4096 x 4096 for 2**24), for rank-1 normalisation")
    parser.add_argument("--single-size", type=int, default=2**24, help="elements of the 'single' case")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-torchao", action="store_true", help="skip torchao (it compiles for ~20 s)")
    parser.add_argument("--low-bit", action="store_true",
                        help="add the 4-bit rows: quantlab AdamW with FOUR_BIT and block-wise, torchao AdamW4bit")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter and gradient dtype")
    parser.add_argument("--out", type=Path, default=Path("results/bench_optim"))
    args = parser.parse_args(argv)
    env = environment()
    env.update(torch_threads=torch.get_num_threads(), device=args.device, dtype=args.dtype)
    env["command"] = " ".join(["python -m experiments.bench.optim", *(sys.argv[1:] if argv is None else argv)])
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    sets = parameter_sets(args.cases, args.single_size, args.device, getattr(torch, args.dtype))
    print("environment:", json.dumps(env))
    env["memory_bandwidth_gb_s"] = bandwidth = memory_bandwidth(args.device) / 1e9
    element_size = getattr(torch, args.dtype).itemsize
    print(f"memory bandwidth (in-place read + write): {bandwidth:.1f} GB/s")
    rows = []
    for case, make_params in sets.items():
        makers = optimizers(not args.no_torchao, args.low_bit)
        for name, result in measure(make_params, makers, args.steps, args.warmup).items():
            result.update(case=case, optimizer=name,
                          roofline_ms=1e3 * bytes_moved_per_param(name, element_size) * result["params"]
                          / (bandwidth * 1e9))
            rows.append(result)
            print(f"  {case:28s} {name:42s} {result['ms_per_step']:9.1f} ms  state "
                  f"{result['state_bytes_per_param']:5.2f} B/param  peak extra "
                  f"{result['peak_extra_bytes_per_param']:6.2f} B/param", flush=True)
    text = table(rows)
    checks = {case: nonfinite_check_cost(make_params, args.steps) for case, make_params in sets.items()}
    text += "\n\nNon-finite gradient check per step (ms): " + "; ".join(
        f"{case}: quantlab {c['quantlab_check_ms']:.2f}, torch.isfinite().all() {c['torch_isfinite_all_ms']:.2f}"
        for case, c in checks.items())
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"environment": env, "rows": rows, "nonfinite_check": checks}
    (args.out / "optim.json").write_text(json.dumps(record, indent=2))
    (args.out / "optim.md").write_text(f"environment: {json.dumps(env)}\n\n{text}\n")
    print(f"saved {args.out}/optim.json and optim.md")
    return rows


if __name__ == "__main__":
    main()
