"""What every benchmark row shares: the seed task, the torch.nn side, the user's loop, interleaved timing."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import rdl_functional as rf


def seed_task() -> tuple:
    """One thread, the seed model, seed 0's initial params and training set with one-hot targets."""
    torch.set_num_threads(1)
    data, params, _ = rf.draw_run(0)
    return rf.seed_model(), params, data.x_train, rf.one_hot(data.labels_train, 2)


def train_torch(build, params, x, target, epochs: int, batch_size: int, lr: float, seed: int, make=None):
    """torch.nn + autograd + torch.optim (``make(parameters)``, else SGD(lr)) from our params, on the same batches."""
    model = build()
    model.load_state_dict(rf.to_state_dict(params), strict=True)
    optimizer = make(model.parameters()) if make is not None else torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=g).split(batch_size):
            optimizer.zero_grad()
            F.mse_loss(model(x[rows]), target[rows]).backward()
            optimizer.step()
    return model


def loop_ours(model: rf.Layer, params, x, target, epochs: int, batch_size: int, lr: float, seed: int):
    """The loop a user writes: value_and_grad, then sgd_step, on the batches train_torch draws."""
    step = rf.value_and_grad(model, rf.mse_loss)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=g).split(batch_size):
            _, grads = step(params, x[rows], target[rows])
            params = rf.sgd_step(params, grads, lr)
    return params


def interleaved(sides: dict[str, Callable[[], object]], rounds: int,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall times of each side, ``rounds`` times, alternating which goes first, after one untimed warm-up each.

    With ``cpu`` (a dict), it also gets each side's process CPU time per
    round (all threads): a side that used more than one core shows it.
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    if cpu is not None:
        cpu.update({name: [] for name in sides})
    names = list(sides)
    for side in sides.values():
        side()
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            sides[name]()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu[name].append(time.process_time() - start_cpu)
    return times
