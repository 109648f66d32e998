"""The same experiment trained by torch.nn + autograd + the matching torch.optim optimizer, for comparison.

An oracle, like :mod:`rdl_functional.testing`: it uses torch's autograd on
purpose, to show that the library's hand-written pullbacks give the same
numbers. Only ``rdl-train --compare-torch`` imports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from .experiment import DiscSettings, draw_run
from .layers import Params
from .train import fit
from .tree import tree_flatten, tree_unflatten

__all__ = ["TorchComparison", "compare_with_torch", "torch_optimizer", "torch_seed_model", "train_torch"]


def torch_seed_model() -> torch.nn.Sequential:
    """``rf.seed_model()`` as a ``torch.nn.Sequential``, with the same state-dict keys."""
    return torch.nn.Sequential(
        torch.nn.Linear(2, 25), torch.nn.ReLU(),
        torch.nn.Linear(25, 25), torch.nn.ReLU(),
        torch.nn.Linear(25, 25), torch.nn.ReLU(),
        torch.nn.Linear(25, 2), torch.nn.Tanh(),
    )  # fmt: skip


def torch_optimizer(settings: DiscSettings, parameters: Any) -> torch.optim.Optimizer:
    """The torch.optim optimizer ``settings.make_optimizer()`` equals (foreach implementation), at rate 0:
    :func:`train_torch` sets the rate before each step."""
    momentum, decay = settings.tuned("momentum"), settings.tuned("weight_decay")
    name = settings.optimizer
    if name in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(parameters, lr=0.0, momentum=momentum, nesterov=name == "nesterov",
                               weight_decay=decay, foreach=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=0.0, momentum=momentum, weight_decay=decay, foreach=True)
    if name == "adagrad":
        return torch.optim.Adagrad(parameters, lr=0.0, weight_decay=decay, foreach=True)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(parameters, lr=0.0, weight_decay=decay, foreach=True)


def train_torch(
    params: Params,
    x: Tensor,
    target: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: Callable[[int], float],
    generator: torch.Generator,
    settings: DiscSettings | None = None,
) -> Params:
    """Train ``torch_seed_model()`` from ``params`` the way :func:`~rdl_functional.fit` trains.

    The same shuffles (drawn from ``generator``), the same batches, MSE, and
    the optimizer :func:`torch_optimizer` makes for ``settings`` (plain
    ``torch.optim.SGD`` without them), its rate set from the schedule ``lr``
    before each step.
    """
    model = torch_seed_model()
    model.load_state_dict(tree_flatten(params), strict=True)
    optimizer = torch_optimizer(settings or DiscSettings(), model.parameters())
    count = 0
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=generator).split(batch_size):
            optimizer.param_groups[0]["lr"] = lr(count)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x[rows]), target[rows]).backward()
            optimizer.step()
            count += 1
    return tree_unflatten({key: value.detach().clone() for key, value in model.state_dict().items()})


@attrs.frozen
class TorchComparison:
    """Our run and torch.nn's, from the same params on the same batches."""

    seed: int
    test_accuracy: float
    torch_test_accuracy: float
    train_accuracy: float
    torch_train_accuracy: float
    max_param_difference: float
    seconds: float
    torch_seconds: float
    torch_optimizer: str = "torch.optim.SGD"


def compare_with_torch(seed: int, settings: DiscSettings) -> TorchComparison:
    """Train the seed MLP here and with torch.nn from the same start; compare the results.

    Both sides start from one initial tree and draw one sequence of shuffles,
    all from ``seed``; neither measures the test set during training (ours
    measures the training set after each epoch, as ``fit`` always does).
    """
    if settings.model != "mlp":
        raise ValueError(f"compare_with_torch: the torch baseline is the seed MLP, not {settings.model!r}")
    data, params, generator = draw_run(seed, settings)
    task = settings.task
    model, target = task.model, task.targets(data.labels_train)

    def shuffles() -> torch.Generator:  # a copy, so that both sides draw the same shuffles
        return torch.Generator().set_state(generator.get_state())

    lr = settings.learning_rate()
    schedule = lr if callable(lr) else (lambda count: lr)
    clock = time.perf_counter()
    ours, _ = fit(model, task.loss, params, data.x_train, target, epochs=settings.epochs,
                  batch_size=settings.batch_size, optimizer=settings.make_optimizer(), generator=shuffles())
    seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    theirs = train_torch(params, data.x_train, target, epochs=settings.epochs,
                         batch_size=settings.batch_size, lr=schedule, generator=shuffles(), settings=settings)
    torch_seconds = time.perf_counter() - clock

    def accuracy(params: Params, x: Tensor, labels: Tensor) -> float:
        return (model.apply(params, x).argmax(dim=1) == labels).double().mean().item()

    ours_flat, theirs_flat = tree_flatten(ours), tree_flatten(theirs)
    return TorchComparison(
        seed=seed,
        test_accuracy=accuracy(ours, data.x_test, data.labels_test),
        torch_test_accuracy=accuracy(theirs, data.x_test, data.labels_test),
        train_accuracy=accuracy(ours, data.x_train, data.labels_train),
        torch_train_accuracy=accuracy(theirs, data.x_train, data.labels_train),
        max_param_difference=max((ours_flat[k] - theirs_flat[k]).abs().max().item() for k in ours_flat),
        seconds=seconds,
        torch_seconds=torch_seconds,
        torch_optimizer=f"torch.optim.{type(torch_optimizer(settings, [torch.zeros(1)])).__name__}",
    )
