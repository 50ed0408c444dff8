"""Benchmark training steps on torch.distributed (gloo, CPU): 1 process vs 2, quantlab AdamW 8-bit vs torch AdamW.

    python -m experiments.bench.distributed --out results/bench_distributed/distributed.json

One MLP (256 -> width -> width -> 256, GELU), a fixed global batch per step; 2 processes take half
each, under DistributedDataParallel, or under DDP with ZeroRedundancyOptimizer (ZeRO-1: each rank
keeps the state of its share of the parameters and broadcasts them after stepping). Every process
runs torch and Numba on one thread. Printed and saved as JSON: the median wall time of a whole
training step (zero_grad, forward, backward with DDP's all-reduce, optimizer step with ZeRO's
broadcast), the slower rank's, after warm-up steps; and the optimizer state bytes each rank holds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numba
import torch
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer

import quantlab.optim as qo
from quantlab.provenance import environment

WORLD_SIZE = 2


def launch(worker, *args, world_size: int = WORLD_SIZE, timeout: float = 120.0) -> None:
    """Run ``worker(rank, *args)`` in ``world_size`` spawned processes and wait. A worker's exception
    is raised here with its traceback (torch's ProcessRaisedException; the other workers are
    stopped); workers still running after ``timeout`` seconds are killed and TimeoutError raised."""
    context = mp.start_processes(worker, args=args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{worker.__name__} still running after {timeout:.0f} s: its processes were killed")


def init_gloo(rank: int, init_method: str, world_size: int = WORLD_SIZE) -> None:
    """One thread per process (the ranks share the machine's cores); a dead peer fails a collective
    after a minute instead of hanging it."""
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                                         timeout=timedelta(seconds=60))


def make_model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                               torch.nn.GELU(), torch.nn.Linear(width, 256))


def make_optimizer(name: str, params, zero: bool):
    optimizer_class = {"quantlab AdamW 8-bit": qo.AdamW, "torch AdamW": torch.optim.AdamW}[name]
    if zero:
        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, lr=1e-3)
    return optimizer_class(params, lr=1e-3)


def measure(setup: str, name: str, rank: int, world_size: int, config: dict) -> dict:
    """This rank's median seconds of a training step, and the state bytes it holds."""
    model = make_model(config["width"])
    trained = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    optimizer = make_optimizer(name, model.parameters(), zero=setup == "ZeRO")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(config["batch"], 256, generator=gen), torch.randn(config["batch"], 256, generator=gen)
    x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    seconds = []
    for _ in range(config["warmup"] + config["steps"]):
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(trained(x), y).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    local_optimizer = optimizer.optim if setup == "ZeRO" else optimizer
    return {"setup": setup, "optimizer": name, "step_s": statistics.median(seconds[config["warmup"]:]),
            "state_bytes": qo.state_bytes(local_optimizer)}


def summary_row(setup: str, per_rank: list) -> dict:
    """One setup's ranks' measurements: the slowest rank's step time, each rank's state bytes."""
    return {"setup": setup, "optimizer": per_rank[0]["optimizer"], "step_ms": 1e3 * max(r["step_s"] for r in per_rank),
            "state_bytes_per_rank": [r["state_bytes"] for r in per_rank]}


def two_process_job(rank: int, init_method: str, out_dir: str, config: dict) -> None:
    init_gloo(rank, init_method)
    try:
        results = [measure(setup, name, rank, WORLD_SIZE, config)
                   for setup in ("DDP", "ZeRO") for name in config["optimizers"]]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    parser.add_argument("--batch", type=int, default=64, help="global batch (2 processes: half each)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench_distributed/distributed.json"))
    args = parser.parse_args(argv)
    config = {"width": args.width, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
              "optimizers": ["quantlab AdamW 8-bit", "torch AdamW"]}
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    rows = [summary_row("1 process", [measure("1 process", name, 0, 1, config)]) for name in config["optimizers"]]
    with tempfile.TemporaryDirectory() as tmp:
        launch(two_process_job, f"file://{tmp}/rendezvous", tmp, config, timeout=300)
        per_rank = [json.loads((Path(tmp) / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    rows += [summary_row(f"{WORLD_SIZE} gloo processes, {measured[0]['setup']}", list(measured))
             for measured in zip(*per_rank)]

    n_params = sum(p.numel() for p in make_model(args.width).parameters())
    print(f"MLP of {n_params} parameters, global batch {args.batch}, median of {args.steps} steps (slowest rank)")
    for row in rows:
        state = " + ".join(f"{b / 2**20:.2f}" for b in row["state_bytes_per_rank"])
        print(f"  {row['setup']:28s} {row['optimizer']:22s} {row['step_ms']:8.1f} ms/step   state {state} MiB")
    result = {"environment": {**environment(), "torch_threads": 1, "numba_threads": 1}, "config": config,
              "parameters": n_params, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")
    return result


if __name__ == "__main__":
    main()
