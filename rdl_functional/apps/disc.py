"""The seed report's experiment: which points of [0,1]² lie inside a disc?

The seed model is a 2-25-25-25-2 MLP (ReLU, Tanh output) trained with plain
SGD on MSE against one-hot targets; the baseline the report left as a TODO,
logistic regression, is one linear layer trained on cross-entropy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor

from ..combinators import compose
from ..data import disc_dataset, one_hot
from ..ensemble import fit_stacked, stack_params, unstack_params
from ..initializers import INITIALIZERS
from ..layers import Layer, Params, linear, relu, tanh
from ..losses import Loss, cross_entropy_loss, mse_loss
from ..optim import (
    Optimizer,
    Schedule,
    adagrad,
    adam,
    adamw,
    cosine_decay_schedule,
    linear_schedule,
    rmsprop,
    sgd,
    warmup_cosine_decay_schedule,
)
from ..stateful import State, StatefulLayer
from ..stateful import batch_norm as _batch_norm
from ..stateful import dropout as _dropout
from ..step import _params_difference
from ..train import History, fit, predict
from ..tree import tree_flatten, tree_unflatten

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

__all__ = [
    "DEFAULTS",
    "LOSSES",
    "MODELS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TUNED",
    "DiscData",
    "DiscResult",
    "DiscSettings",
    "Task",
    "check_params_fit",
    "draw_run",
    "logistic_model",
    "run_disc",
    "run_disc_together",
    "seed_model",
    "summarize",
]


def seed_model(init: str = "torch_default", *, dropout: float = 0.0, batch_norm: bool = False) -> Layer | StatefulLayer:
    """The seed report's model: 2-25-25-25-2, ReLU after each hidden layer, Tanh output.

    ``init`` names how each weight is drawn (see :func:`~rdl_functional.linear`).
    ``batch_norm`` puts a :func:`~rdl_functional.batch_norm` after each hidden
    linear layer (before its ReLU), and ``dropout > 0`` a
    :func:`~rdl_functional.dropout` after each hidden ReLU: the usual places.
    Either makes the model a :class:`~rdl_functional.StatefulLayer`.
    """
    layers: list[Layer | StatefulLayer] = []
    for fan_in in (2, 25, 25):
        layers.append(linear(fan_in, 25, init=init))
        layers += [_batch_norm(25)] if batch_norm else []
        layers.append(relu)
        layers += [_dropout(dropout)] if dropout else []
    return compose(*layers, linear(25, 2, init=init), tanh)


def logistic_model(init: str = "torch_default") -> Layer:
    """Logistic regression on the disc task: one linear layer, 2 inputs to 2 logits."""
    return linear(2, 2, init=init)


@attrs.frozen
class Task:
    """A model for the disc task, the loss it trains on, and its targets made from labels.

    The model is built once: a layer is an immutable value, and one object
    lets a compiled step (``--compile``) serve every run.
    """

    model: Layer | StatefulLayer
    loss: Loss
    targets: Callable[[Tensor], Tensor]
    description: str


MODELS = {
    "mlp": Task(seed_model(), mse_loss, lambda labels: one_hot(labels, 2),
                "2-25-25-25-2 MLP (ReLU, Tanh output), MSE on one-hot targets"),
    "logistic": Task(logistic_model(), cross_entropy_loss, lambda labels: labels,
                     "logistic regression (one linear layer), cross-entropy on labels"),
}  # fmt: skip
SCHEDULES = ("linear", "constant", "cosine", "warmup-cosine")
LOSSES = {  # what each loss compares the model's outputs with
    "mse": (mse_loss, lambda labels: one_hot(labels, 2), "MSE on one-hot targets"),
    "cross-entropy": (cross_entropy_loss, lambda labels: labels, "cross-entropy on labels"),
}
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad")

TUNED: dict[str, dict[str, float]] = {
    # The peak learning rate (and momentum, weight decay) of each optimizer on the disc task with the
    # seed model, batch 100, 200 epochs and the linear schedule, from a sweep of three rates each over
    # seeds 0-9 (docs/optimizers.md has it): the rate with the best mean and worst test accuracy. The
    # medians of the good rates differ by one or two test points in 1000.
    "sgd": {"lr": 0.8, "momentum": 0.0, "weight_decay": 0.0},
    "momentum": {"lr": 0.08, "momentum": 0.9, "weight_decay": 0.0},
    "nesterov": {"lr": 0.08, "momentum": 0.9, "weight_decay": 0.0},
    "adam": {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0},
    "adamw": {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.01},
    "rmsprop": {"lr": 0.003, "momentum": 0.0, "weight_decay": 0.0},
    "adagrad": {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
}


def _check_probability(p: object) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"DiscSettings: dropout must be a probability in [0, 1), got {p!r}")


@attrs.frozen
class DiscSettings:
    """How :func:`run_disc` trains; by default plain SGD with a linearly decaying rate, as the seed study.

    Attributes:
        epochs, batch_size: passes over the training set, and points per step.
        lr: the peak learning rate (``None``: the optimizer's tuned one, :data:`TUNED`);
            with ``schedule="linear"``, the first step's rate, decaying linearly to 0
            at the last step.
        schedule: ``"linear"``, ``"constant"``, ``"cosine"`` (cosine decay to 0) or
            ``"warmup-cosine"`` (a linear warm-up over the first 5% of steps, then cosine decay).
        optimizer: one of :data:`OPTIMIZERS`; ``"momentum"`` and ``"nesterov"`` are SGD with momentum.
        momentum, weight_decay: ``None``: the optimizer's tuned values.
        model: a key of :data:`MODELS`, ``"mlp"`` (the seed model) or ``"logistic"``.
        n_train, n_test: the sizes of the fresh training and test sets.
        compile: train through ``torch.compile`` (see ``fit``); plain SGD, one run at a time.
        capture: run each step's gradient as a CUDA graph (see ``fit``); a CUDA ``device``,
            a plain model, one run at a time.
        init: how the weights are drawn, a name of :data:`~rdl_functional.initializers.INITIALIZERS`.
        loss: ``"mse"`` or ``"cross-entropy"``; ``None``: the model's own.
        dropout, batch_norm: the seed model with dropout of this probability after each hidden
            ReLU, and batch norm after each hidden linear layer (see :func:`seed_model`).
        device, dtype: where the data and params live (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...), and
            their floating dtype (``"float32"`` or ``"float64"``). Everything is drawn on the CPU
            first, so a seed names the same run on every device.
    """

    epochs: int = 200
    batch_size: int = 100
    lr: float | None = None
    schedule: str = attrs.field(default="linear", validator=attrs.validators.in_(SCHEDULES))
    model: str = attrs.field(default="mlp", validator=attrs.validators.in_(tuple(MODELS)))
    n_train: int = 1000
    n_test: int = 1000
    compile: bool = False
    capture: bool = False
    optimizer: str = attrs.field(default="sgd", validator=attrs.validators.in_(OPTIMIZERS))
    momentum: float | None = None
    weight_decay: float | None = None
    init: str = attrs.field(default="torch_default", validator=attrs.validators.in_(tuple(INITIALIZERS)))
    loss: str | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.in_(
        ("mse", "cross-entropy"))))
    dropout: float = attrs.field(default=0.0, validator=lambda _, __, p: _check_probability(p))
    batch_norm: bool = False
    device: str = "cpu"
    dtype: str = attrs.field(default="float32", validator=attrs.validators.in_(("float32", "float64")))

    @property
    def task(self) -> Task:
        """The model (with ``init``'s weights) and the loss (``loss``, else the model's own)."""
        task = MODELS[self.model]
        own_loss = self.loss is None or LOSSES[self.loss][0] is task.loss
        if self.init == "torch_default" and own_loss and not (self.dropout or self.batch_norm):
            return task  # one object per model, so a compiled step serves every run
        if self.model != "mlp" and (self.dropout or self.batch_norm):
            raise ValueError(f"DiscSettings: dropout and batch norm go into the seed MLP, not model={self.model!r}")
        model = (seed_model(self.init, dropout=self.dropout, batch_norm=self.batch_norm) if self.model == "mlp"
                 else logistic_model(self.init))
        model_words, loss_words = task.description.rsplit(", ", 1)
        model_words += ", batch norm" if self.batch_norm else ""
        model_words += f", dropout {self.dropout:g}" if self.dropout else ""
        loss, targets, loss_words = LOSSES[self.loss] if self.loss else (task.loss, task.targets, loss_words)
        description = f"{model_words}, {loss_words}"
        if self.init != "torch_default":
            description += f", {self.init} init"
        return Task(model, loss, targets, description)

    def targets(self, labels: Tensor) -> Tensor:
        """What the task's loss compares the outputs with, for ``labels``, in these settings' dtype."""
        target = self.task.targets(labels)
        return target.to(getattr(torch, self.dtype)) if target.is_floating_point() else target

    def tuned(self, name: str) -> float:
        """The value of ``lr``, ``momentum`` or ``weight_decay``: the one set, or the optimizer's tuned one."""
        value = getattr(self, name)
        return TUNED[self.optimizer][name] if value is None else value

    @property
    def rate(self) -> float:
        """The peak learning rate: ``lr``, or the optimizer's tuned one."""
        return self.tuned("lr")

    def learning_rate(self) -> float | Schedule:
        """The learning rate of these settings: a float for ``"constant"``, else a schedule of the step count."""
        steps = max(self.epochs * -(-self.n_train // self.batch_size), 1)
        if self.schedule == "constant":
            return self.rate
        if self.schedule == "cosine":
            return cosine_decay_schedule(self.rate, steps)
        if self.schedule == "warmup-cosine":
            warmup = max(steps // 20, 1) if steps > 1 else 0
            return warmup_cosine_decay_schedule(0.0, self.rate, warmup, max(steps, warmup + 1))
        return linear_schedule(self.rate, 0.0, steps)

    def make_optimizer(self) -> Optimizer:
        """The optimizer these settings name, with their rate schedule, momentum and weight decay."""
        lr, momentum, decay = self.learning_rate(), self.tuned("momentum"), self.tuned("weight_decay")
        if self.optimizer in ("sgd", "momentum", "nesterov"):
            return sgd(lr, momentum=momentum, nesterov=self.optimizer == "nesterov", weight_decay=decay)
        if self.optimizer == "rmsprop":
            return rmsprop(lr, momentum=momentum, weight_decay=decay)
        if self.optimizer == "adagrad":
            return adagrad(lr, weight_decay=decay)
        return (adam if self.optimizer == "adam" else adamw)(lr, weight_decay=decay)

    def describe(self) -> str:
        """The optimizer in words: ``"plain SGD"``, ``"SGD with Nesterov momentum 0.9"``, ``"Adam"``, ..."""
        names = {"sgd": "plain SGD", "momentum": "SGD with momentum", "nesterov": "SGD with Nesterov momentum",
                 "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "adagrad": "Adagrad"}
        text = names[self.optimizer]
        if self.optimizer in ("momentum", "nesterov") or self.tuned("momentum"):
            text += f"{'' if self.optimizer in ('momentum', 'nesterov') else ', momentum'} {self.tuned('momentum'):g}"
        if self.tuned("weight_decay"):
            text += f", weight decay {self.tuned('weight_decay'):g}"
        return text

    def describe_rate(self) -> str:
        """The rate in words: ``"lr 0.8 decaying linearly to 0"``, ..."""
        shape = {"linear": "decaying linearly to 0", "constant": "(constant)", "cosine": "with cosine decay to 0",
                 "warmup-cosine": "after a 5% linear warm-up, with cosine decay to 0"}[self.schedule]
        return f"lr {self.rate:g} {shape}"


DEFAULTS = DiscSettings()


def _resolved(settings: DiscSettings) -> dict[str, Any]:
    """The values a run trains with, as JSON data: ``settings`` with the optimizer's tuned lr, momentum and weight
    decay and the model's own loss filled in (momentum ``None`` for an optimizer that has none), so that a value
    given and the same value left to its default name one run."""
    own_loss = next(name for name, (loss, _, _) in LOSSES.items() if loss is MODELS[settings.model].loss)
    takes_momentum = settings.optimizer in ("momentum", "nesterov", "rmsprop")
    return {**attrs.asdict(settings), "lr": settings.rate, "weight_decay": settings.tuned("weight_decay"),
            "momentum": settings.tuned("momentum") if takes_momentum else None, "loss": settings.loss or own_loss}


@attrs.frozen
class DiscData:
    """The points of one run: training and test sets, ``x`` float32 ``(n, 2)``, labels int64 ``(n,)``."""

    x_train: Tensor
    labels_train: Tensor
    x_test: Tensor
    labels_test: Tensor


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
    history: History = attrs.field(repr=False)
    data: DiscData = attrs.field(repr=False)
    model_state: State | None = attrs.field(default=None, repr=False)
    """A stateful model's state at the end (batch norm's running statistics), ``None`` for a plain model."""

    def summary(self) -> dict[str, float | int]:
        """The run's figures as plain numbers, for tables and JSON."""
        return {
            "seed": self.seed,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "test_errors": self.test_errors,
            "train_loss": self.train_loss,
            "test_loss": self.test_loss,
            "seconds": self.seconds,
        }


def check_params_fit(model: Layer | StatefulLayer, params: Params, dtype: torch.dtype = torch.float32) -> None:
    """Raise ValueError naming the first path where ``params`` cannot serve ``model``.

    Compares keys, shapes and dtypes with ``model.init(0, dtype=dtype)``'s; the
    empty entries of parameterless layers may be absent, as in a torch state dict.
    """
    found = _params_difference(model, params, dtype)
    if found:
        raise ValueError(f"the params do not fit {model.name}: {found}")


def draw_run(seed: int, settings: DiscSettings = DEFAULTS) -> tuple[DiscData, Params, torch.Generator]:
    """What a seed draws before training: the data, the initial params, and the generator to shuffle with.

    One generator seeded with ``seed`` draws, in order, the training set, the
    test set and the initial params; it is returned ready for the shuffles.
    """
    g = torch.Generator().manual_seed(seed)
    x_train, labels_train = disc_dataset(settings.n_train, g)
    x_test, labels_test = disc_dataset(settings.n_test, g)
    dtype = getattr(torch, settings.dtype)
    params = settings.task.model.init(g, dtype=dtype, device=settings.device)
    data = DiscData(*(t.to(settings.device, dtype) if t.is_floating_point() else t.to(settings.device)
                      for t in (x_train, labels_train, x_test, labels_test)))
    return data, params, g


def run_disc(
    seed: int,
    settings: DiscSettings = DEFAULTS,
    *,
    init_params: Params | None = None,
    callback: Callable[[int, Params, History], None] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_info: Any = None,
    check_finite: bool = True,
    on_resume: Callable[[Checkpoint], None] | None = None,
) -> DiscResult:
    """Train a model on fresh disc data and evaluate it on fresh test points.

    One generator seeded with ``seed`` draws, in order, the training set, the
    test set, the initial params and every epoch's shuffle: a seed names one
    whole run. ``init_params`` (checked with :func:`check_params_fit`)
    replaces the drawn initial params; they are drawn anyway, so a seed gives
    the same data and batches either way. ``callback``, ``checkpoint``,
    ``checkpoint_every``, ``checkpoint_info``, ``check_finite`` and ``on_resume``
    are passed to :func:`~rdl_functional.fit` (the checkpoint records the seed and the
    settings besides, by the values trained with: ``lr=None`` and the tuned
    rate it stands for are one run). A run of more (or fewer) epochs resumes
    from a checkpoint as ``fit`` allows: with ``schedule="constant"``.
    """
    start = time.perf_counter()
    task = settings.task
    model = task.model
    data, params, g = draw_run(seed, settings)
    if init_params is not None:
        check_params_fit(model, init_params, getattr(torch, settings.dtype))
        params = init_params
    if settings.compile and settings.optimizer != "sgd":
        raise ValueError(f"run_disc: compile=True trains with plain SGD, not {settings.optimizer}")
    how = dict(lr=settings.learning_rate()) if settings.compile else dict(optimizer=settings.make_optimizer())
    params, history = fit(
        model, task.loss, params, data.x_train, settings.targets(data.labels_train),
        epochs=settings.epochs, batch_size=settings.batch_size, generator=g,
        test=(data.x_test, settings.targets(data.labels_test)), callback=callback, compile=settings.compile,
        capture=settings.capture,
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, check_finite=check_finite, on_resume=on_resume,
        checkpoint_info=None if checkpoint is None else {"seed": seed, "settings": _recorded(settings),
                                                         "caller": checkpoint_info},
        **how,
    )  # fmt: skip
    return _result(seed, settings, model, params, history, data, time.perf_counter() - start)


def _recorded(settings: DiscSettings) -> dict[str, Any]:
    """What a checkpoint's info records of ``settings``: the resolved values, less ``epochs``, which ``fit``
    records itself (and compares as the length of a run that may be extended)."""
    return {name: value for name, value in _resolved(settings).items() if name != "epochs"}


def _result(
    seed: int, settings: DiscSettings, model: Layer | StatefulLayer, params: Params, history: History,
    data: DiscData, seconds: float
) -> DiscResult:
    """A run's figures, measured on its trained params."""
    state = history.model_state
    test_errors = int((predict(model, params, data.x_test, state=state) != data.labels_test).sum())
    train_correct = int((predict(model, params, data.x_train, state=state) == data.labels_train).sum())
    return DiscResult(
        seed=seed,
        settings=settings,
        train_accuracy=train_correct / max(settings.n_train, 1),
        test_accuracy=1 - test_errors / max(settings.n_test, 1),
        test_errors=test_errors,
        train_loss=history.train_loss[-1] if history.epochs else float("nan"),
        test_loss=history.test_loss[-1] if history.epochs else float("nan"),
        seconds=seconds,
        params=params,
        history=history,
        data=data,
        model_state=state,
    )


def run_disc_together(
    seeds: Sequence[int],
    settings: DiscSettings = DEFAULTS,
    *,
    init_params: Params | None = None,
    callback: Callable[[int, Params, list[History]], None] | None = None,
    check_finite: bool = True,
) -> list[DiscResult]:
    """:func:`run_disc` for several seeds, trained together as one stack of models.

    Each seed draws its own data, initial params and shuffles exactly as
    :func:`run_disc` does, and its result equals that of ``run_disc(seed)``
    to float rounding (over a long run, rounding can still move a borderline
    point across the boundary). The stack costs far less than the runs one
    after another: a step of N models is about the tensor operations of one.
    Each result's ``seconds`` is its share of the stack's wall time.
    """
    if not seeds:
        raise ValueError("run_disc_together: expected at least one seed, got none")
    if settings.compile or settings.capture:
        raise ValueError(f"run_disc_together: a {'compiled' if settings.compile else 'captured'} step trains one "
                         "model; run the seeds with run_disc")
    if settings.dropout or settings.batch_norm:
        raise ValueError("run_disc_together: a stack of models does not thread dropout's randomness or batch "
                         "norm's state; run the seeds with run_disc")
    start = time.perf_counter()
    task = settings.task
    model = task.model
    drawn = [draw_run(seed, settings) for seed in seeds]
    if init_params is not None:
        check_params_fit(model, init_params, getattr(torch, settings.dtype))
    starts = [init_params if init_params is not None else params for _, params, _ in drawn]
    data = [d for d, _, _ in drawn]
    x, x_test = torch.stack([d.x_train for d in data]), torch.stack([d.x_test for d in data])
    target = torch.stack([settings.targets(d.labels_train) for d in data])
    target_test = torch.stack([settings.targets(d.labels_test) for d in data])
    stacked, histories = fit_stacked(
        model, task.loss, stack_params([tree_unflatten(tree_flatten(p)) for p in starts]), x, target,
        epochs=settings.epochs, batch_size=settings.batch_size, optimizer=settings.make_optimizer(),
        generators=[g for _, _, g in drawn], test=(x_test, target_test), callback=callback,
        check_finite=check_finite,
    )  # fmt: skip
    seconds = (time.perf_counter() - start) / len(seeds)
    return [
        _result(seed, settings, model, params, history, d, seconds)
        for seed, params, history, d in zip(seeds, unstack_params(stacked), histories, data, strict=True)
    ]


def summarize(results: list[DiscResult]) -> dict[str, dict[str, float]]:
    """Median, mean, standard deviation, worst and best of each figure over several runs.

    "Worst" is the lowest accuracy and the highest error count, loss and time.
    The standard deviation is the sample one (n − 1), 0 for a single run.
    """
    if not results:
        raise ValueError("summarize: no runs to summarize")
    from .tasks import summarize_runs  # every task's summary, the disc's figures

    return summarize_runs(results, ("train_accuracy", "test_accuracy", "test_errors", "train_loss", "test_loss",
                                    "seconds"))
