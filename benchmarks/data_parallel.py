"""Data-parallel training, 1 process against 2, ours against torch DDP: ``python -m benchmarks.data_parallel``.

A wide MLP (2-2048-2048-2048-2, ReLU, Tanh output), global batch 4096, MSE,
plain SGD, one intra-op thread per process, gloo on 127.0.0.1. Each run
times its steps after a warm-up and reports the median step time and (ours)
the median time spent inside the all-reduce. Rounds alternate the order of
the runs; medians over rounds. Not a test: the figures are for
docs/data-parallel.md and the closing note, on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys

WORKER = r"""
import json, os, statistics, sys, time, torch
import torch.distributed as dist
import torch.nn.functional as F
import rdl_functional as rf
from rdl_functional.distributed import all_reduce_mean, shard
torch.set_num_threads(1)
mode, steps, width, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
size = int(os.environ.get("WORLD_SIZE", "1"))
if size > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if size > 1 else 0
g = torch.Generator().manual_seed(0)
x, target = torch.rand(batch, 2, generator=g), torch.rand(batch, 2, generator=g)
a, b = shard(0, batch, rank, size)
x, target = x[a:b], target[a:b]
times, comm = [], []
if mode == "ddp":
    from torch.nn.parallel import DistributedDataParallel
    net = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                              torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
                              torch.nn.Linear(width, 2), torch.nn.Tanh())
    model = DistributedDataParallel(net) if size > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
else:
    model = rf.compose(rf.linear(2, width), rf.relu, rf.linear(width, width), rf.relu, rf.linear(width, width),
                       rf.relu, rf.linear(width, 2), rf.tanh)
    params = model.init(0)
    run = rf.autodiff._gradient_fn(model, rf.mse_loss)
    weight = torch.tensor((b - a) / batch)
    for step in range(steps + 2):
        start = time.perf_counter()
        _, grads = run(params, x, target, weight)
        if size > 1:
            c = time.perf_counter()
            grads = all_reduce_mean(grads, weight=1.0)
            spent = time.perf_counter() - c
        else:
            spent = 0.0
        params = rf.sgd_step(params, grads, 0.01)
        if step >= 2:
            times.append(time.perf_counter() - start)
            comm.append(spent)
if rank == 0:
    print(json.dumps({"step_s": statistics.median(times), "comm_s": statistics.median(comm) if comm else None}))
if size > 1:
    dist.destroy_process_group()
"""


def _run(mode: str, nproc: int, steps: int, width: int, batch: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path]), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(nproc)}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, mode, str(steps), str(width), str(batch)],
                                      env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{mode} with {nproc} processes failed")
    return json.loads(outs[0].strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args(argv)
    runs = [("ours", 1), ("ours", 2), ("ddp", 1), ("ddp", 2)]
    results: dict[str, list[dict]] = {f"{m}-{n}": [] for m, n in runs}
    for round_ in range(args.rounds):
        for mode, nproc in runs if round_ % 2 == 0 else runs[::-1]:
            results[f"{mode}-{nproc}"].append(_run(mode, nproc, args.steps, args.width, args.batch))
    step = {name: statistics.median(r["step_s"] for r in rs) for name, rs in results.items()}
    comm = statistics.median(r["comm_s"] for r in results["ours-2"])
    print(f"machine: {os.cpu_count()} CPUs; 2-{args.width}-{args.width}-{args.width}-2 MLP, global batch "
          f"{args.batch}, 1 thread a process, medians of {args.rounds} rounds of {args.steps} steps\n")
    print("| run | step | speed-up over 1 process | in the all-reduce |\n| --- | ---: | ---: | ---: |")
    for name in step:
        base = step[name.split("-")[0] + "-1"]
        share = f"{comm / step[name]:.0%}" if name == "ours-2" else ""
        print(f"| {name} | {step[name] * 1e3:.1f} ms | {base / step[name]:.2f}× | {share} |")
    print(f"\nours-2 / ddp-2 step time: {step['ours-2'] / step['ddp-2']:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
