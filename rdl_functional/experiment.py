"""The seed report's experiment: a 2-25-25-25-2 MLP learns which points lie in a disc."""

from __future__ import annotations

import time

import attrs
import torch

from .combinators import compose
from .data import disc_dataset, one_hot
from .layers import Layer, Params, linear, relu, tanh
from .losses import mse_loss
from .optim import Schedule, linear_schedule
from .train import fit, predict

__all__ = ["DEFAULTS", "SCHEDULES", "DiscResult", "DiscSettings", "run_disc", "seed_model"]


def seed_model() -> Layer:
    """The seed report's model: 2-25-25-25-2, ReLU after each hidden layer, Tanh output."""
    return compose(
        linear(2, 25), relu,
        linear(25, 25), relu,
        linear(25, 25), relu,
        linear(25, 2), tanh,
    )  # fmt: skip


SCHEDULES = ("linear", "constant")


@attrs.frozen
class DiscSettings:
    """How :func:`run_disc` trains: plain SGD on MSE against one-hot targets.

    Attributes:
        epochs, batch_size: passes over the training set, and points per step.
        lr: the learning rate; with ``schedule="linear"``, the first step's
            rate, decaying linearly to 0 at the last step.
        schedule: ``"linear"`` or ``"constant"``.
        n_train, n_test: the sizes of the fresh training and test sets.
    """

    epochs: int = 200
    batch_size: int = 100
    lr: float = 0.8
    schedule: str = attrs.field(default="linear", validator=attrs.validators.in_(SCHEDULES))
    n_train: int = 1000
    n_test: int = 1000

    def learning_rate(self) -> float | Schedule:
        """The ``lr`` argument of :func:`~rdl_functional.fit` for these settings."""
        if self.schedule == "constant":
            return self.lr
        steps = self.epochs * -(-self.n_train // self.batch_size)
        return linear_schedule(self.lr, 0.0, max(steps, 1))


DEFAULTS = DiscSettings()


@attrs.frozen
class DiscResult:
    """One run of the disc experiment."""

    seed: int
    settings: DiscSettings
    train_accuracy: float
    test_accuracy: float
    test_errors: int
    train_loss: float
    test_loss: float
    seconds: float
    params: Params = attrs.field(repr=False)


def run_disc(seed: int, settings: DiscSettings = DEFAULTS) -> DiscResult:
    """Train the seed model on fresh disc data and evaluate it on fresh test points.

    One generator seeded with ``seed`` draws, in order, the training set, the
    test set, the initial params and every epoch's shuffle: a seed names one
    whole run.
    """
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x_train, labels_train = disc_dataset(settings.n_train, g)
    x_test, labels_test = disc_dataset(settings.n_test, g)
    model = seed_model()
    params = model.init(g)
    params, history = fit(
        model, mse_loss, params, x_train, one_hot(labels_train, 2),
        epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.learning_rate(), generator=g,
    )  # fmt: skip
    test_pred = model.apply(params, x_test)
    test_loss = mse_loss(test_pred, one_hot(labels_test, 2)).item()
    test_errors = int((test_pred.argmax(dim=1) != labels_test).sum())
    train_correct = (predict(model, params, x_train) == labels_train).sum().item()
    return DiscResult(
        seed=seed,
        settings=settings,
        train_accuracy=train_correct / max(settings.n_train, 1),
        test_accuracy=1 - test_errors / max(settings.n_test, 1),
        test_errors=test_errors,
        train_loss=history.train_loss[-1] if history.train_loss else float("nan"),
        test_loss=test_loss,
        seconds=time.perf_counter() - start,
        params=params,
    )
