"""Beyond the MLP: a training step of a CNN (the digits task's size) and of a small transformer (the adder's).

For each model, these sides run interleaved in one process on one thread,
from the same initial params over the same batches, each timed over whole
runs of ``steps`` steps (SGD and Adam, torch.optim's foreach kernels on both sides):

- ``torch``: the torch.nn twin + autograd + torch.optim, the baseline of every ratio;
- ``floor``: the twin's step as straight-line aten code, traced once by ``make_fx`` from ``torch.func``'s
  gradient of a ``functional_call`` of the twin (the kernels autograd runs, no modules, no autograd engine),
  then the optimizer's foreach kernels: what is left once the Python of a library is gone;
- ``ours``: a loop of ``rf.train_step`` (the traced step, concepts 5.1).

Each model is one row: our time per step, torch.nn's, the ratio, and the ratio to the floor.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

import rdl_functional as rf
from benchmarks.common import interleaved

LR = {"sgd": 0.05, "adam": 1e-3}
TORCH = {"sgd": lambda ps: torch.optim.SGD(ps, lr=LR["sgd"], foreach=True),
         "adam": lambda ps: torch.optim.Adam(ps, lr=LR["adam"], foreach=True)}
OURS = {"sgd": lambda: rf.sgd(LR["sgd"]), "adam": lambda: rf.adam(LR["adam"])}


class TorchCNN(torch.nn.Module):
    """The twin of :func:`cnn`: names as ``rf.to_state_dict`` writes the rf model's params."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [
            torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.BatchNorm2d(2 * width), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(2 * width * 4, 10)]
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x


def cnn(width: int = 32) -> rf.StatefulLayer:
    """A CNN of the digits task's size on ``(N, 1, 8, 8)``: three 3×3 convolutions with batch norm, two max-pools,
    a linear head to 10 classes."""
    return rf.compose(rf.conv2d(1, width, 3, padding=1), rf.batch_norm2d(width), rf.relu,
                      rf.conv2d(width, width, 3, padding=1), rf.batch_norm2d(width), rf.relu, rf.max_pool2d(2),
                      rf.conv2d(width, 2 * width, 3, padding=1), rf.batch_norm2d(2 * width), rf.relu,
                      rf.max_pool2d(2), rf.flatten(), rf.linear(2 * width * 4, 10))


def cnn_task(batch_size: int = 64, steps: int = 25) -> dict:
    """The CNN, its twin, its params and ``steps`` batches of 8×8 images with labels."""
    torch.set_num_threads(1)
    model, twin = cnn(), TorchCNN()
    params = model.init(0)
    twin.load_state_dict(rf.to_state_dict(params, model.init_state()), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(steps, batch_size, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (steps, batch_size), generator=g)
    return {"name": f"CNN on 8×8 images (digits size: 3 convs of 32–64 channels with batch norm, 2 max-pools, "
                    f"linear), batch {batch_size}", "model": model, "twin": twin, "params": params,
            "batches": list(zip(x, labels, strict=True)), "loss": rf.cross_entropy_loss, "torch_loss": F.cross_entropy}


def _ours(task: dict, optimizer: str) -> Callable[[], object]:
    model, params = task["model"], task["params"]

    def run() -> object:
        opt = OURS[optimizer]()
        step = rf.train_step(model, task["loss"], opt)
        state = rf.train_state(model, opt, params, generator=0)
        for x, y in task["batches"]:
            state, _ = step(state, x, y)
        return state

    return run


def _torch(task: dict, optimizer: str) -> Callable[[], object]:
    start = {k: v.clone() for k, v in task["twin"].state_dict().items()}

    def run() -> object:
        twin = task["twin"]
        twin.load_state_dict(start)
        twin.train()
        opt = TORCH[optimizer](twin.parameters())
        for x, y in task["batches"]:
            opt.zero_grad()
            task["torch_loss"](twin(x), y).backward()
            opt.step()
        return twin

    return run


def _floor(task: dict, optimizer: str) -> Callable[[], object]:
    """The twin's step traced to straight-line aten code, then torch.optim's foreach update by hand."""
    from torch.fx.experimental.proxy_tensor import make_fx

    twin = task["twin"]
    names = [name for name, _ in twin.named_parameters()]
    start = {k: v.clone() for k, v in twin.state_dict().items()}
    buffers = {k: v for k, v in start.items() if k not in names}

    def grads(params: list[torch.Tensor], buffers: dict, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        def loss(p: list[torch.Tensor], b: dict) -> torch.Tensor:  # batch norm updates b in place
            out = torch.func.functional_call(twin, {**dict(zip(names, p, strict=True)), **b}, (x,))
            return task["torch_loss"](out, y)

        return torch.func.grad(loss)(params, buffers)

    x0, y0 = task["batches"][0]
    traced = make_fx(grads)([start[n].clone() for n in names], {k: v.clone() for k, v in buffers.items()}, x0, y0)

    def run() -> object:
        params = [start[n].clone() for n in names]
        state = {k: v.clone() for k, v in buffers.items()}
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        for count, (x, y) in enumerate(task["batches"], 1):
            g = traced(params, state, x, y)
            if optimizer == "sgd":
                torch._foreach_add_(params, g, alpha=-LR["sgd"])
                continue
            torch._foreach_lerp_(m, g, 0.1)
            torch._foreach_mul_(v, 0.999)
            torch._foreach_addcmul_(v, g, g, value=0.001)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, (1 - 0.999**count) ** 0.5)
            torch._foreach_add_(denom, 1e-8)
            torch._foreach_addcdiv_(params, m, denom, (LR["adam"] / (1 - 0.9**count)) * -1)
        return params

    return run


def model_rows(task: dict, optimizer: str, rounds: int, target: str) -> dict:
    """One row: rf.train_step's loop against the torch.nn twin, with the floor beside it."""
    sides = {"ours": _ours(task, optimizer), "torch": _torch(task, optimizer), "floor": _floor(task, optimizer)}
    cpu: dict[str, list[float]] = {}
    times = interleaved(sides, rounds, cpu=cpu)
    steps = len(task["batches"])
    ours, theirs, floor = (statistics.median(times[name]) for name in ("ours", "torch", "floor"))

    def per_round(over: str) -> list[float]:
        return [a / b for a, b in zip(times["ours"], times[over], strict=True)]

    return {"workload": f"{'SGD' if optimizer == 'sgd' else 'Adam'} step, {task['name']}: rf.train_step loop "
                        f"(the floor at {floor / theirs:.2f}× of torch.nn)",
            "threads": 1, "per_step": True, "optimizer": optimizer, "side": "train_step", "ours_s": ours / steps,
            "torch_s": theirs / steps,
            "ratio": ours / theirs, "ratio_min": min(per_round("torch")), "ratio_max": max(per_round("torch")),
            "vs_floor": ours / floor, "vs_floor_min": min(per_round("floor")), "vs_floor_max": max(per_round("floor")),
            "cpu_per_wall": sum(cpu["ours"]) / sum(times["ours"]), "target": target, "rounds": rounds}


def gpt_task(batch_size: int = 64, steps: int = 25) -> dict:
    """The adder task's transformer (minGPT's gpt-nano: 3 causal pre-LN blocks, 3 heads, 48 features, the answer
    head), its torch.nn twin, its params and ``steps`` batches of the adder's problems."""
    from rdl_functional.apps.adder import MODEL, addition_split, encode, inputs_and_targets
    from rdl_functional.apps.adder_torch import torch_adder_model

    torch.set_num_threads(1)
    params = MODEL.init(0)
    twin = torch_adder_model()
    twin.load_state_dict(rf.to_state_dict(params), strict=True)
    train, _ = addition_split(0)
    x, y = inputs_and_targets(encode(train[: batch_size * steps]))
    batches = list(zip(x.split(batch_size), y.split(batch_size), strict=True))
    return {"name": f"the adder's transformer (3 blocks, 3 heads, 48 features, 6 tokens), batch {batch_size}",
            "model": MODEL, "twin": twin, "params": params, "batches": batches, "loss": rf.nll_loss(),
            "torch_loss": lambda out, target: F.nll_loss(out.flatten(0, 1), target.flatten())}


TASKS = {"cnn": cnn_task, "gpt": gpt_task}


def table(rounds: int, quick: bool = False) -> list[dict]:
    """The rows of issue 18: each model, SGD and Adam, against torch.nn (target ≤ 1.00×, goal 0.80×)."""
    rows = []
    for make in TASKS.values():
        task = make(steps=2) if quick else make()
        for optimizer in ("sgd", "adam"):
            rows.append(model_rows(task, optimizer, 1 if quick else rounds, "≤ 1.00× (goal 0.80×)"))
    return rows
