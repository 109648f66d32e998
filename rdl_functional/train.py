"""Training: minibatch gradient descent over a data set, and the metrics it reports."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from ._random import as_generator
from .autodiff import value_and_grad
from .layers import Layer, Params
from .losses import Loss
from .optim import Schedule, _check_lr, constant_schedule, sgd_step

__all__ = ["History", "accuracy", "fit", "predict"]


@attrs.frozen
class History:
    """What :func:`fit` saw, one entry per epoch.

    Attributes:
        train_loss: the mean loss over the epoch's minibatches, each weighted
            by its size (so a short last batch counts for what it holds).
    """

    train_loss: tuple[float, ...]


def predict(model: Layer, params: Params, x: Tensor) -> Tensor:
    """Class predictions: the index of the largest output, ``(batch,)`` int64."""
    return model.apply(params, x).argmax(dim=1)


def accuracy(model: Layer, params: Params, x: Tensor, labels: Tensor) -> float:
    """The fraction of rows of ``x`` whose predicted class equals ``labels``."""
    if labels.shape != x.shape[:1]:
        raise ValueError(f"accuracy: labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    return (predict(model, params, x) == labels).double().mean().item()


def _check_count(where: str, name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int ≥ {minimum}, got {value!r}")


def fit(
    model: Layer,
    loss: Loss,
    params: Params,
    x: Tensor,
    target: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float | Schedule,
    generator: torch.Generator | int,
) -> tuple[Params, History]:
    """Train with plain SGD on shuffled minibatches; return the new params and a history.

    Each epoch draws a permutation of the rows from ``generator`` and steps
    through it ``batch_size`` rows at a time (the last batch may be shorter).
    Pure: ``params``, ``x`` and ``target`` are not changed, and the same
    generator state gives the same bits.

    Args:
        model, loss: what to train and against what.
        params: the starting params (not changed).
        x: ``(n, features)`` inputs; target: ``(n, ...)`` what ``loss`` compares with.
        epochs: passes over the data, ≥ 0. batch_size: rows per step, ≥ 1.
        lr: the learning rate, finite and ≥ 0, or a schedule: a function of the
            step count (0, 1, ...) such as :func:`~rdl_functional.linear_schedule`.
        generator: a ``torch.Generator`` (advanced) or an ``int`` seed, for shuffling.
    """
    _check_count("fit", "epochs", epochs, 0)
    _check_count("fit", "batch_size", batch_size, 1)
    schedule = lr if callable(lr) else constant_schedule(_check_lr(lr, "fit"))
    if x.shape[:1] != target.shape[:1]:
        raise ValueError(f"fit: x has {x.shape[0]} rows but target has {target.shape[0]}")
    g = as_generator(generator, "fit")
    n = x.shape[0]
    step = value_and_grad(model, loss)
    train_loss = []
    count = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        values, sizes = [], []
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            value, grads = step(params, x[rows], target[rows])
            params = sgd_step(params, grads, schedule(count))
            count += 1
            values.append(value)
            sizes.append(rows.shape[0])
        if values:
            weights = torch.tensor(sizes, dtype=values[0].dtype)
            train_loss.append((torch.stack(values) @ weights / n).item())
    return params, History(train_loss=tuple(train_loss))
