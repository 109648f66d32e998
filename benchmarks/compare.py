"""rdl_functional against torch.nn + autograd + torch.optim.SGD, measured side by side.

``python -m benchmarks.compare`` runs every row interleaved in one process
(the two whole-process rows in subprocesses), alternating which side goes
first, and prints medians over rounds with their min–max, the machine and the
thread counts; ``--json PATH`` writes the same. ``--quick`` runs tiny sizes
(the test suite uses it to check that the benchmark runs; its numbers mean
nothing). Both sides always get the same model, data, batches, initial params
and thread count. ``--steps`` runs only the step table (benchmarks/steps.py:
the straight-line floor, rf's steps and, when the ``bench`` extra is
installed, ``jax.jit``'s, per step, against torch.nn and the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import rdl_functional as rf
from benchmarks import models, steps
from benchmarks.common import interleaved, loop_ours, seed_task, train_torch
from benchmarks.floor import floor_sgd
from rdl_functional.apps.torch_baseline import torch_seed_model

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# The two sides


def mlp(width: int) -> tuple[rf.Layer, Callable[[], torch.nn.Sequential]]:
    """2-W-W-W-2, ReLU, Tanh output: the seed model at another width, ours and torch's."""
    ours = rf.compose(rf.linear(2, width), rf.relu, rf.linear(width, width), rf.relu,
                      rf.linear(width, width), rf.relu, rf.linear(width, 2), rf.tanh)

    def theirs() -> torch.nn.Sequential:
        return torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                   torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, 2), torch.nn.Tanh())

    return ours, theirs


def train_ours(model: rf.Layer, params, x, target, epochs: int, batch_size: int, lr: float, seed: int):
    return rf.fit(model, rf.mse_loss, params, x, target, epochs=epochs, batch_size=batch_size, lr=lr,
                  generator=torch.Generator().manual_seed(seed), record_history=False)[0]


# ---------------------------------------------------------------------------
# Measuring


def row(name: str, threads: int, times: dict[str, list[float]], target: str, **extra) -> dict:
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["torch"])
    ratios = [a / b for a, b in zip(times["ours"], times["torch"], strict=True)]
    return {"workload": name, "threads": threads, "ours_s": ours, "torch_s": theirs, "ratio": ours / theirs,
            "ratio_min": min(ratios), "ratio_max": max(ratios), "target": target, "rounds": len(ratios), **extra}


def seed_task_row(epochs: int, batch_size: int, rounds: int, target: str) -> dict:
    model, params, x, y = seed_task()
    times = interleaved({
        "ours": lambda: train_ours(model, params, x, y, epochs, batch_size, 0.1, 1),
        "torch": lambda: train_torch(torch_seed_model, params, x, y, epochs, batch_size, 0.1, 1),
    }, rounds)
    return row(f"seed task, batch {batch_size}, {epochs} epochs", 1, times, target)


# The optimizers of the optimizer rows: ours, and the torch.optim twin (foreach, the same hyperparameters).
OPTIMIZERS = {
    "adam": (lambda: rf.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True)),
    "momentum": (lambda: rf.sgd(0.08, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.08, momentum=0.9,
                                                                                 foreach=True)),
}


def update_loop(model: rf.Layer, optimizer: rf.Optimizer, params, x, target, epochs: int, batch_size: int,
                seed: int):
    """The optax-style loop a user writes: value_and_grad, then update, then apply_updates."""
    step = rf.value_and_grad(model, rf.mse_loss)
    state = optimizer.init(params)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=g).split(batch_size):
            _, grads = step(params, x[rows], target[rows])
            updates, state = optimizer.update(grads, state, params)
            params = rf.apply_updates(params, updates)
    return params


def optimizer_row(name: str, loop: bool, epochs: int, rounds: int, target: str) -> dict:
    """fit (or the user's update loop) with one of our optimizers, against torch.nn + its torch.optim twin."""
    model, params, x, y = seed_task()
    ours, theirs = OPTIMIZERS[name]

    def fit_ours() -> None:
        rf.fit(model, rf.mse_loss, params, x, y, epochs=epochs, batch_size=100, optimizer=ours(), generator=1,
               record_history=False)

    times = interleaved({
        "ours": (lambda: update_loop(model, ours(), params, x, y, epochs, 100, 1)) if loop else fit_ours,
        "torch": lambda: train_torch(torch_seed_model, params, x, y, epochs, 100, 0.0, 1, make=theirs),
    }, rounds)
    how = "the loop a user writes (value_and_grad + update + apply_updates)" if loop else "fit"
    return row(f"{how} with rf.{ours().name if name == 'adam' else 'sgd(momentum=0.9)'} vs torch.optim "
               f"{'Adam' if name == 'adam' else 'SGD(momentum=0.9)'}(foreach=True), seed task, batch 100, "
               f"{epochs} epochs", 1, times, target)


def stateful_row(epochs: int, batch_size: int, rounds: int, target: str) -> dict:
    """The user's loop on the seed model with batch norm and dropout 0.1 (value_and_grad threading the state,
    then sgd_step), against the torch.nn twin in train mode, its masks from the global RNG."""
    torch.set_num_threads(1)
    settings = rf.DiscSettings(dropout=0.1, batch_norm=True)
    data, params, _ = rf.draw_run(0, settings)
    model, x, y = settings.task.model, data.x_train, rf.one_hot(data.labels_train, 2)

    def ours() -> None:
        step, state = rf.value_and_grad(model, rf.mse_loss), model.init_state()
        p, g = params, torch.Generator().manual_seed(1)
        for _ in range(epochs):
            for rows in torch.randperm(x.shape[0], generator=g).split(batch_size):
                _, grads, state = step(p, state, x[rows], y[rows], generator=g)
                p = rf.sgd_step(p, grads, 0.1)

    def theirs() -> None:
        module = torch_seed_model(dropout=0.1, batch_norm=True).train()
        module.load_state_dict(rf.to_state_dict(params, model.init_state()), strict=True)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for _ in range(epochs):
                for rows in torch.randperm(x.shape[0]).split(batch_size):
                    optimizer.zero_grad()
                    F.mse_loss(module(x[rows]), y[rows]).backward()
                    optimizer.step()

    times = interleaved({"ours": ours, "torch": theirs}, rounds)
    return row(f"the loop a user writes, seed model with batch norm and dropout 0.1, batch {batch_size}, "
               f"{epochs} epochs", 1, times, target)


def pure_loop_row(epochs: int, batch_size: int, rounds: int, target: str) -> dict:
    """The user's own loop (value_and_grad + sgd_step) and the straight-line floor, against torch.nn."""
    model, params, x, y = seed_task()
    times = interleaved({
        "ours": lambda: loop_ours(model, params, x, y, epochs, batch_size, 0.1, 1),
        "torch": lambda: train_torch(torch_seed_model, params, x, y, epochs, batch_size, 0.1, 1),
        "floor": lambda: floor_sgd(params, x, y, epochs, batch_size, 0.1, 1),
        "fit": lambda: train_ours(model, params, x, y, epochs, batch_size, 0.1, 1),
    }, rounds)
    floor, fit = statistics.median(times["floor"]), statistics.median(times["fit"])
    return row(f"the loop a user writes (value_and_grad + sgd_step), seed task, batch {batch_size}, {epochs} epochs",
               1, times, target, floor_ratio=floor / statistics.median(times["torch"]),
               floor_ratio_min=min(a / b for a, b in zip(times["floor"], times["torch"], strict=True)),
               floor_ratio_max=max(a / b for a, b in zip(times["floor"], times["torch"], strict=True)),
               fit_ratio=fit / statistics.median(times["torch"]))


def history_row(epochs: int, batch_size: int, rounds: int, target: str) -> dict:
    """What fit's per-epoch history costs: fit recording it against fit with record_history=False (both ours)."""
    torch.set_num_threads(1)
    data, params, _ = rf.draw_run(0)
    x, y = data.x_train, rf.one_hot(data.labels_train, 2)
    test = (data.x_test, rf.one_hot(data.labels_test, 2))
    model = rf.seed_model()

    def run(record: bool, with_test: bool) -> None:
        rf.fit(model, rf.mse_loss, params, x, y, epochs=epochs, batch_size=batch_size, lr=0.1, generator=1,
               test=test if with_test else None, record_history=record)

    times = interleaved({"ours": lambda: run(True, False), "torch": lambda: run(False, False),
                         "with_test": lambda: run(True, True)}, rounds)
    result = row(f"fit's history (train-set loss and accuracy each epoch) vs record_history=False, seed task, "
                 f"batch {batch_size}, {epochs} epochs", 1, times, target)
    result["baseline"] = "record_history=False"
    result["with_test_ratio"] = statistics.median(times["with_test"]) / statistics.median(times["torch"])
    return result


def gemm_floor(params, x) -> Callable[[], None]:
    """The step's own matrix products, run alone: 4 forward, 4 weight-gradient and 3 input-gradient GEMMs."""
    weights = [params[k]["weight"] for k in ("0", "2", "4", "6")]
    activations = [x]
    for w in weights[:-1]:
        activations.append(torch.empty(x.shape[0], w.shape[0]).uniform_(0, 1))
    grads = [torch.empty(x.shape[0], w.shape[0]).uniform_(-1, 1) for w in weights]

    def run() -> None:
        for a, w, b in zip(activations, weights, (params[k]["bias"] for k in ("0", "2", "4", "6")), strict=True):
            torch.addmm(b, a, w.t())
        for a, dy in zip(activations, grads, strict=True):
            dy.t().mm(a)
        for dy, w in zip(grads[1:], weights[1:], strict=True):
            dy.mm(w)

    return run


def wide_setup(width: int):
    """The 2-W-W-W-2 model, ours and torch's, its initial params, and 1000 disc points with one-hot targets."""
    model, build = mlp(width)
    g = torch.Generator().manual_seed(0)
    params = model.init(g)
    x, labels = rf.disc_dataset(1000, g)
    return model, build, params, x, rf.one_hot(labels, 2)


def wide_row(width: int, steps: int, rounds: int, target: str, floor: bool) -> dict:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model, build, params, x, y = wide_setup(width)
    sides = {
        "ours": lambda: train_ours(model, params, x, y, steps, 1000, 0.01, 1),
        "torch": lambda: train_torch(build, params, x, y, steps, 1000, 0.01, 1),
    }
    if floor:
        products = gemm_floor(params, x)  # the operands are made once, outside the timing
        sides["floor"] = lambda: [products() for _ in range(steps)]
    times = interleaved(sides, rounds)
    extra = {}
    if floor:
        extra["gemm_floor_s"] = statistics.median(times["floor"])
        extra["floor_fraction"] = extra["gemm_floor_s"] / statistics.median(times["ours"])
        extra["torch_floor_fraction"] = extra["gemm_floor_s"] / statistics.median(times["torch"])
    result = row(f"2-{width}-{width}-{width}-2, batch 1000, {steps} steps", threads, times, target, **extra)
    for key in ("ours_s", "torch_s"):  # per step
        result[key] /= steps
    return result


def stacked_row(models: int, epochs: int, rounds: int, target: str) -> dict:
    """N seeds trained together against one seed alone: both ours, on one thread."""
    torch.set_num_threads(1)
    runs = [rf.draw_run(seed) for seed in range(models)]
    model, settings = rf.seed_model(), rf.DiscSettings(epochs=epochs)
    x = torch.stack([d.x_train for d, _, _ in runs])
    y = torch.stack([rf.one_hot(d.labels_train, 2) for d, _, _ in runs])
    stacked = rf.stack_params([p for _, p, _ in runs])

    def together() -> None:
        rf.fit_stacked(model, rf.mse_loss, stacked, x, y, epochs=epochs, batch_size=100, lr=settings.learning_rate(),
                       generators=[torch.Generator().manual_seed(s) for s in range(models)], record_history=False)

    def alone() -> None:
        rf.fit(model, rf.mse_loss, runs[0][1], x[0], y[0], epochs=epochs, batch_size=100, lr=settings.learning_rate(),
               generator=torch.Generator().manual_seed(0), record_history=False)

    times = interleaved({"ours": together, "torch": alone}, rounds)
    result = row(f"{models} seeds of the seed task trained together vs one alone (both ours), {epochs} epochs", 1,
                 times, target)
    result["baseline"] = "one seed alone"
    return result


def compile_row(epochs: int, rounds: int, target: str) -> dict:
    """fit(compile=True) against torch.nn eager, in the steady state; the compile time apart."""
    model, params, x, y = seed_task()

    def ours() -> None:
        rf.fit(model, rf.mse_loss, params, x, y, epochs=epochs, batch_size=100, lr=0.1,
               generator=torch.Generator().manual_seed(1), record_history=False, compile=True)

    import torch._dynamo as dynamo

    dynamo.reset()  # so that the compile time below is a first compilation's
    start = time.perf_counter()
    rf.fit(model, rf.mse_loss, params, x[:100], y[:100], epochs=1, batch_size=100, lr=0.1, generator=0,
           record_history=False, compile=True)
    compile_seconds = time.perf_counter() - start
    times = interleaved({
        "ours": ours,
        "torch": lambda: train_torch(torch_seed_model, params, x, y, epochs, 100, 0.1, 1),
    }, rounds)
    return row(f"compiled step (fit(compile=True)), seed task, batch 100, {epochs} epochs, steady state", 1, times,
               target, compile_s=compile_seconds)


def capture_row(steps: int, rounds: int, target: str) -> dict:
    """On a GPU: the seed step (value_and_grad + sgd_step, batch 100) captured whole by ``rf.capture`` against
    torch.nn + autograd + torch.optim.SGD (foreach) eager; our own eager step besides. Skipped without CUDA."""
    name = f"seed step on CUDA, captured whole (rf.capture) vs torch.nn eager, batch 100, {steps} steps"
    if not torch.cuda.is_available():
        return {"workload": name, "threads": 1, "target": target, "skipped": "no CUDA device on this machine"}
    model, params, x, y = seed_task()
    params = rf.tree_map(lambda p: p.cuda(), params)
    batches = [(x[i:i + 100].cuda(), y[i:i + 100].cuda()) for i in range(0, x.shape[0], 100)]
    grad = rf.value_and_grad(model, rf.mse_loss)

    def step(p, xb, yb):
        loss, grads = grad(p, xb, yb)
        return loss, rf.sgd_step(p, grads, 0.1)

    captured = rf.capture(step)

    def ours(run=captured) -> None:
        p = params
        for k in range(steps):
            _, p = run(p, *batches[k % len(batches)])
        torch.cuda.synchronize()

    net = torch_seed_model().cuda()
    net.load_state_dict(rf.to_state_dict(params), strict=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, foreach=True)

    def theirs() -> None:
        for k in range(steps):
            xb, yb = batches[k % len(batches)]
            optimizer.zero_grad()
            F.mse_loss(net(xb), yb).backward()
            optimizer.step()
        torch.cuda.synchronize()

    times = interleaved({"ours": ours, "torch": theirs, "eager": lambda: ours(step)}, rounds)
    eager = statistics.median(times["eager"])
    return row(name, 1, times, target, device=torch.cuda.get_device_name(), eager_s=eager,
               captured_vs_eager=statistics.median(times["ours"]) / eager)


def process_row(epochs: int, rounds: int, target: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    commands = {
        "ours": [sys.executable, "-m", "rdl_functional", "--epochs", str(epochs), "--quiet"],
        "torch": [sys.executable, str(ROOT / "benchmarks" / "torch_train.py"), str(epochs)],
    }
    times = interleaved({name: lambda c=c: subprocess.run(c, env=env, check=True, capture_output=True)
                         for name, c in commands.items()}, rounds)
    return row(f"whole process: rdl-train vs a torch.nn script, {epochs} epochs", 1, times, target)


def import_row(rounds: int, target: str) -> dict:
    """What ``import rdl_functional`` adds once torch is imported, from ``python -X importtime``.

    The cumulative time Python reports for the package itself: far steadier
    than the difference of two whole-process timings of about two seconds each.
    Measured as an installed package runs, with its bytecode cached (pip
    compiles it at install; here a private ``PYTHONPYCACHEPREFIX``, warmed by
    one untimed run), and also without a cache, as this machine runs
    everything (``PYTHONDONTWRITEBYTECODE=1``: each module compiled at each import).
    """
    import tempfile

    base = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])

    def measure(env: dict) -> tuple[float, float]:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch, rdl_functional"],
                              env=env, check=True, capture_output=True, text=True)
        line = next(line for line in done.stderr.splitlines() if line.rstrip().endswith("| rdl_functional"))
        return int(line.split("|")[1]) / 1e6, time.perf_counter() - start

    with tempfile.TemporaryDirectory() as cache:
        cached = {**base, "PYTHONPYCACHEPREFIX": cache}
        uncached = {**base, "PYTHONDONTWRITEBYTECODE": "1"}
        measure(cached)  # writes the bytecode
        added, total, cold = [], [], []
        for _ in range(rounds):
            seconds, whole = measure(cached)
            added.append(seconds)
            total.append(whole)
            cold.append(measure(uncached)[0])
    return {"workload": "import rdl_functional on top of import torch (python -X importtime), bytecode cached as "
                        f"installed (without a cache: adds {1000 * statistics.median(cold):.0f} ms)", "threads": 1,
            "added_ms": 1000 * statistics.median(added), "added_ms_max": 1000 * max(added),
            "uncached_ms": 1000 * statistics.median(cold), "process_s": statistics.median(total), "target": target}


def peak_memory(train: Callable[[], object]) -> float:
    """The peak of torch's CPU allocations while ``train`` runs, in MiB above where it started.

    From the profiler's allocation and free events in time order: it sees
    every tensor, and no Python object (which neither side has many of).
    """
    from torch.profiler import ProfilerActivity, profile

    train()  # warm-up: one-time allocations (thread pools, lazy state) are not training's
    stderr = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # the profiler announces itself on stderr
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = train()
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
    # An event's own allocations are placed at its start and its own frees at its
    # end: autograd's engine frees a node's saved tensors in the node's event,
    # after the children that allocate its outputs, and counting that free at the
    # event's start would understate torch's peak.
    changes = sorted(
        (event.time_range.start if event.self_cpu_memory_usage > 0 else event.time_range.end,
         event.self_cpu_memory_usage)
        for event in prof.events() if event.self_cpu_memory_usage
    )
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    del result
    return peak / 2**20


def memory_row(width: int, steps: int, target: str) -> dict:
    """Peak memory of training: both sides build their working params inside the measurement."""
    torch.set_num_threads(1)
    model, build, params, x, y = wide_setup(width)
    peaks = {
        "ours": peak_memory(lambda: train_ours(model, params, x, y, steps, 1000, 0.01, 1)),
        "torch": peak_memory(lambda: train_torch(build, params, x, y, steps, 1000, 0.01, 1)),
    }
    return {"workload": f"peak memory of training, 2-{width}-{width}-{width}-2, batch 1000, {steps} steps",
            "threads": 1, "ours_mib": peaks["ours"], "torch_mib": peaks["torch"],
            "ratio": peaks["ours"] / peaks["torch"], "target": target}


# ---------------------------------------------------------------------------
# The table


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def format_table(rows: list[dict], info: dict) -> str:
    lines = [f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, Python {info['python']}; "
             f"{info['date']}", "",
             "| workload | threads | ours | torch.nn | ratio (median) | min–max | target |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['workload']} | {r['threads']} | not measured: {r['skipped']} | | | | {r['target']} |")
            continue
        if "process_s" in r:
            lines.append(f"| {r['workload']} | {r['threads']} | adds {r['added_ms']:.0f} ms "
                         f"(max {r['added_ms_max']:.0f}) | whole `import torch, rdl_functional`: "
                         f"{r['process_s']:.2f} s | | | {r['target']} |")
            continue
        if "ours_mib" in r:
            lines.append(f"| {r['workload']} | {r['threads']} | {r['ours_mib']:.1f} MiB | {r['torch_mib']:.1f} MiB "
                         f"| {r['ratio']:.2f}× | | {r['target']} |")
            continue
        unit, suffix = (1e6, "µs") if r.get("per_step") else (1000, "ms") if r["ours_s"] < 1 else (1, "s")
        note = ""
        if "floor_fraction" in r:
            note = f" (GEMM floor: {r['floor_fraction']:.0%} of ours, {r['torch_floor_fraction']:.0%} of torch's)"
        if "compile_s" in r:
            note = f" (compiling took {r['compile_s']:.1f} s once)"
        if "with_test_ratio" in r:
            note = f" (with the test set too: {r['with_test_ratio']:.2f}×)"
        if "floor_ratio" in r:
            note = (f" (same round: straight-line floor {r['floor_ratio']:.2f}×, "
                    f"{r['floor_ratio_min']:.2f}–{r['floor_ratio_max']:.2f}; fit {r['fit_ratio']:.2f}×)")
        if "captured_vs_eager" in r:
            note = f" ({r['device']}; captured {r['captured_vs_eager']:.2f}× of our eager step)"
        if "vs_floor" in r:
            note = (f" (to the floor: {r['vs_floor']:.2f}×, {r['vs_floor_min']:.2f}–{r['vs_floor_max']:.2f}; "
                    f"{r['cpu_per_wall']:.2f} CPU s per wall s"
                    + (f"; first call, tracing and compiling: {r['compile_s']:.1f} s" if "compile_s" in r else "")
                    + ")")
        baseline = f" ({r['baseline']})" if "baseline" in r else ""
        lines.append(f"| {r['workload']}{note} | {r['threads']} | {r['ours_s'] * unit:.3g} {suffix} | "
                     f"{r['torch_s'] * unit:.3g} {suffix}{baseline} | {r['ratio']:.2f}× | {r['ratio_min']:.2f}–"
                     f"{r['ratio_max']:.2f} | {r['target']} |")
    return "\n".join(lines)


def run(quick: bool, rounds: int, gpu: bool = False, only_steps: bool = False, only_models: bool = False
        ) -> list[dict]:
    if gpu:
        return [capture_row(20 if quick else 1000, 1 if quick else rounds, "≤ 0.10× (≥ 10× faster)")]
    if only_steps:
        return steps.table(1 if quick else rounds, quick)
    if only_models:
        return models.table(rounds, quick)
    if quick:
        return [seed_task_row(2, 100, 1, "runs"), pure_loop_row(2, 100, 1, "runs"),
                optimizer_row("adam", False, 2, 1, "runs"), optimizer_row("adam", True, 2, 1, "runs"),
                wide_row(16, 1, 1, "runs", floor=True), memory_row(16, 1, "runs"), stacked_row(3, 2, 1, "runs"),
                import_row(1, "runs"), stateful_row(2, 100, 1, "runs"), *steps.table(1, quick=True),
                *models.table(1, quick=True)]
    rows = [
        seed_task_row(200, 100, rounds, "≤ 0.45×"),
        seed_task_row(20, 10, rounds, "≤ 0.45×"),
        seed_task_row(200, 1000, rounds, "≤ 0.75×"),
        pure_loop_row(200, 100, rounds, "≤ 0.45×"),
        pure_loop_row(20, 10, rounds, "≤ 0.42×"),
        pure_loop_row(200, 1000, rounds, "≤ 0.65×"),
        *steps.table(rounds),
        *models.table(rounds),
        process_row(200, rounds, "≤ 0.55×"),
        import_row(rounds, "adds ≤ 50 ms"),
        wide_row(256, 20, rounds, "≤ 1.00×", floor=False),
        wide_row(1024, 5, rounds, "≤ 1.00×, ≥ 95% of GEMM floor", floor=True),
        wide_row(4096, 2, rounds, "≤ 1.00×, ≥ 95% of GEMM floor", floor=True),
        memory_row(1024, 5, "≤ torch.nn's"),
        stacked_row(10, 200, rounds, "≤ 2×"),
        optimizer_row("adam", False, 200, rounds, "≤ 0.50×"),
        optimizer_row("momentum", False, 200, rounds, "≤ 0.50×"),
        optimizer_row("adam", True, 200, rounds, "≤ 0.55×"),
        stateful_row(200, 100, rounds, "≤ 1.00×"),
        history_row(200, 100, rounds, "report"),
        history_row(200, 1000, rounds, "report"),
        compile_row(200, rounds, "report"),
        capture_row(1000, rounds, "≤ 0.10× (≥ 10× faster)"),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that it runs")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per row (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--gpu", action="store_true", help="only the GPU rows (a row says so when there is no GPU)")
    parser.add_argument("--steps", action="store_true",
                        help="only the step table: the floor, rf and jax.jit steps, SGD and Adam, batch 10, 100, 1000")
    parser.add_argument("--models", action="store_true",
                        help="only the rows of the CNN and the transformer against their torch.nn twins")
    args = parser.parse_args(argv)
    info = machine()
    rows = run(args.quick, args.rounds, args.gpu, args.steps, args.models)
    print(format_table(rows, info))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
