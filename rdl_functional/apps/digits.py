"""``rdl-train --task digits``: scikit-learn's 8×8 handwritten digits, classified by a small CNN.

The data: the 1,797 images of ``sklearn.datasets.load_digits`` (bundled with scikit-learn, nothing is
downloaded; the optional extra ``rdl_functional[tasks]``), pixels 0..16 scaled to 0..1 and standardized with the
training set's mean and standard deviation, split 80/20 stratified by digit, the split fixed by the seed.

The model, channels first ``(N, 1, 8, 8)``: a random 1-pixel shift in training (:func:`random_shift`), three 3×3
convolutions (padding 1; no bias, as the batch norm after each shifts by its own), each with batch norm and ReLU, a
2×2 max-pool after the second and the third, dropout, and one linear layer to the 10 logits. AdamW on
cross-entropy with a one-cycle rate: a linear warm-up over the first 30% of steps from peak/25 to the peak, then
cosine decay to peak/25e4 (``torch.optim.lr_scheduler.OneCycleLR``'s ends, its shape linear on the way up).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor

import rdl_functional as rf

from ..layers import Layer, Params
from ..stateful import State, StatefulLayer
from ..train import History, fit, predict
from .tasks import Column, Comparison, TrainingTask, checkpoint_record, summarize_runs

if TYPE_CHECKING:
    from pathlib import Path

    from ..checkpoint import Checkpoint

__all__ = ["DEFAULTS", "TASK", "DigitsData", "DigitsResult", "DigitsSettings", "digits_model", "draw_run",
           "load_digits", "one_cycle_schedule", "random_shift", "run_digits"]

EXTRA = "pip install 'rdl_functional[tasks]'"


@attrs.frozen
class DigitsSettings:
    """How :func:`run_digits` trains; the defaults reach a median test accuracy of 99% or more over seeds 0-4.

    Attributes:
        epochs, batch_size: passes over the training set (1,437 images), and images per step.
        lr: the one-cycle rate's peak (see :func:`one_cycle_schedule`); weight_decay: AdamW's.
        dropout: the probability of dropout before the linear layer.
        width: the channels of the first two convolutions (the third has twice as many).
        shift: the largest random shift in training, in pixels (0: none).
        test_fraction: the share of each digit held out as the test set.
        device, dtype: where the data and params live, and their floating dtype.
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 0.05
    dropout: float = 0.4
    width: int = 32
    shift: int = 1
    test_fraction: float = 0.2
    device: str = "cpu"
    dtype: str = attrs.field(default="float32", validator=attrs.validators.in_(("float32", "float64")))


DEFAULTS = DigitsSettings()


def _sklearn(module: str) -> Any:
    """``sklearn.<module>``, imported here alone, so that a missing scikit-learn names the extra to install."""
    import importlib

    try:
        return importlib.import_module(f"sklearn.{module}")
    except ImportError:
        raise ModuleNotFoundError(f"the digits task needs scikit-learn, whose 8×8 digits it trains on: {EXTRA}") \
            from None


def load_digits() -> tuple[Tensor, Tensor]:
    """The 1,797 images as float32 ``(1797, 1, 8, 8)`` in 0..1, and their digits int64 ``(1797,)``."""
    digits = _sklearn("datasets").load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    return images, torch.tensor(digits.target, dtype=torch.int64)


@attrs.frozen
class DigitsData:
    """One seed's split: ``x`` ``(n, 1, 8, 8)`` standardized, labels int64 ``(n,)``, and the test images in 0..1."""

    x_train: Tensor
    labels_train: Tensor
    x_test: Tensor
    labels_test: Tensor
    images_test: Tensor


def split(seed: int, settings: DigitsSettings = DEFAULTS) -> DigitsData:
    """The stratified split of ``seed`` (scikit-learn's ``train_test_split`` with ``random_state=seed``)."""
    train_test_split = _sklearn("model_selection").train_test_split
    images, labels = load_digits()
    train, test = train_test_split(torch.arange(len(labels)).numpy(), test_size=settings.test_fraction,
                                   stratify=labels.numpy(), random_state=seed % 2**32)
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    mean, std = images[train].mean(), images[train].std()
    dtype = getattr(torch, settings.dtype)
    x = ((images - mean) / std).to(settings.device, dtype)
    return DigitsData(x[train], labels[train].to(settings.device), x[test], labels[test].to(settings.device),
                      images[test])


def shift_images(x: Tensor, offsets: Tensor, shift: int) -> Tensor:
    """Each image of ``x`` ``(N, C, H, W)`` moved by its ``offsets`` ``(N, 2)`` in ``0..2·shift`` (``shift`` means
    none) along H and W, the pixels moved in from outside zero."""
    n, c, h, w = x.shape
    padded = torch.constant_pad_nd(x, (shift, shift, shift, shift), 0.0)
    rows = (offsets[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def _offsets(x: Tensor, shift: int, generator: Any) -> Tensor:
    """Each image's offsets, drawn from ``generator`` (for a data-parallel shard: the global batch's, its rows)."""
    if hasattr(generator, "rows"):  # rf's BatchShard: this process's rows of the global batch
        drawn = torch.randint(0, 2 * shift + 1, (generator.rows, 2), generator=generator.generator)
        return drawn[generator.start:generator.stop].to(x.device)
    g = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
    return torch.randint(0, 2 * shift + 1, (x.shape[0], 2), generator=g).to(x.device)


def random_shift(shift: int = 1) -> StatefulLayer:
    """In training, each image ``(N, C, H, W)`` moved by a random whole offset in ``-shift..shift`` along each of
    H and W (zeros moved in), drawn from the call's ``generator``; evaluating, the identity.

    ``y[n, c, i, j] = x[n, c, i + a_n, j + b_n]`` (0 outside), so ``dx`` is ``dy`` moved back:
    ``dx[n, c, i, j] = dy[n, c, i − a_n, j − b_n]``. No params, no state.

    >>> import torch
    >>> y, _ = random_shift(1)({}, {}, torch.ones(2, 1, 3, 3), train=True, generator=torch.Generator().manual_seed(0))
    >>> y.shape
    torch.Size([2, 1, 3, 3])
    """
    name = f"random_shift({shift})"

    def forward(x: Tensor, train: bool, generator: Any) -> tuple[Tensor, Tensor | None]:
        if x.ndim != 4:
            raise ValueError(f"{name}: expected images (N, C, H, W), got a tensor of shape {tuple(x.shape)}")
        if not train or shift == 0:
            return x.clone(), None
        if generator is None:
            raise ValueError(f"{name}: in training it draws each image's shift and needs a generator")
        offsets = _offsets(x, shift, generator)
        return shift_images(x, offsets, shift), offsets

    def apply(params: Params, state: State, x: Tensor, *, train: bool, generator: Any = None) -> tuple[Tensor, State]:
        return forward(x, train, generator)[0], {}

    def vjp(params: Params, state: State, x: Tensor, *, train: bool, generator: Any = None) -> tuple[Any, ...]:
        y, offsets = forward(x, train, generator)

        def pullback(dy: Tensor) -> tuple[Params, Tensor]:
            if offsets is None:
                return {}, dy.clone()
            return {}, shift_images(dy, 2 * shift - offsets, shift)  # dx: dy moved back by the same offsets

        return y, {}, pullback

    return StatefulLayer(init=lambda generator=None, *, dtype=torch.float32, device=None: {},
                         init_state=lambda *, dtype=torch.float32, device=None: {}, apply=apply, vjp=vjp, name=name)


def digits_model(width: int = 32, dropout: float = 0.4, shift: int = 1) -> StatefulLayer:
    """The CNN, ``(N, 1, 8, 8)`` images to ``(N, 10)`` logits (the module's docstring has its layers); equal
    arguments give the same model, whose traced step fit reuses."""
    return _digits_model(width, dropout, shift)


# One model per settings, the same record each call: fit keeps the step's traced records per model, so the seeds
# after the first and --compare-torch's run replay them instead of tracing anew.
@functools.lru_cache(maxsize=8)
def _digits_model(width: int, dropout: float, shift: int) -> StatefulLayer:
    w = width

    def block(fan_in: int, fan_out: int) -> list[Layer | StatefulLayer]:
        return [rf.conv2d(fan_in, fan_out, 3, padding=1, bias=False), rf.batch_norm2d(fan_out), rf.relu]

    return rf.compose(random_shift(shift), *block(1, w), *block(w, w), rf.max_pool2d(2), *block(w, 2 * w),
                      rf.max_pool2d(2), rf.flatten(), rf.dropout(dropout), rf.linear(8 * w, 10))


def one_cycle_schedule(peak: float, steps: int) -> rf.Schedule:
    """A one-cycle rate over ``steps``: linear from ``peak/25`` up to ``peak`` over the first 30% of the steps,
    then cosine decay to ``peak/25e4`` (``torch.optim.lr_scheduler.OneCycleLR``'s ends, ``anneal_strategy="cos"``
    on the way down)."""
    warmup = int(0.3 * steps)
    return rf.warmup_cosine_decay_schedule(peak / 25, peak, warmup, max(steps, warmup + 1), peak / 25e4)


def steps_of(settings: DigitsSettings, n_train: int) -> int:
    return settings.epochs * -(-n_train // settings.batch_size)


def draw_run(seed: int, settings: DigitsSettings = DEFAULTS) -> tuple[DigitsData, Params, torch.Generator]:
    """A seed's split, initial params (drawn from a generator seeded with ``seed``), and that generator, ready to
    draw the shuffles, shifts and dropout masks."""
    data = split(seed, settings)
    g = torch.Generator().manual_seed(seed)
    model = digits_model(settings.width, settings.dropout, settings.shift)
    params = model.init(g, dtype=getattr(torch, settings.dtype), device=settings.device)
    return data, params, g


@attrs.frozen
class DigitsResult:
    """One run of the digits task."""

    seed: int
    settings: DigitsSettings
    train_accuracy: float
    test_accuracy: float
    test_errors: int
    train_loss: float
    test_loss: float
    seconds: float
    params: Params = attrs.field(repr=False)
    history: History = attrs.field(repr=False)
    data: DigitsData = attrs.field(repr=False)
    model_state: State | None = attrs.field(repr=False)
    predictions: Tensor = attrs.field(repr=False)
    """The predicted digit of each test image, int64 ``(n_test,)``."""

    def summary(self) -> dict[str, float | int]:
        """The run's figures as plain numbers, for tables and JSON."""
        return {"seed": self.seed, "train_accuracy": self.train_accuracy, "test_accuracy": self.test_accuracy,
                "test_errors": self.test_errors, "train_loss": self.train_loss, "test_loss": self.test_loss,
                "seconds": self.seconds}


def run_digits(
    seed: int,
    settings: DigitsSettings = DEFAULTS,
    *,
    callback: Callable[[int, Params, History], None] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_info: Any = None,
    on_resume: Callable[[Checkpoint], None] | None = None,
    check_finite: bool = True,
) -> DigitsResult:
    """Train the CNN on ``seed``'s split and measure it on its test images.

    The keywords pass through to :func:`~rdl_functional.fit` (the checkpoint records the task, the seed and the
    settings besides ``checkpoint_info``), so a run resumed from its checkpoint ends bit for bit as the run never
    interrupted.
    """
    start = time.perf_counter()
    data, params, g = draw_run(seed, settings)
    model = digits_model(settings.width, settings.dropout, settings.shift)
    rate = one_cycle_schedule(settings.lr, steps_of(settings, len(data.labels_train)))
    params, history = fit(
        model, rf.cross_entropy_loss, params, data.x_train, data.labels_train, epochs=settings.epochs,
        batch_size=settings.batch_size, optimizer=rf.adamw(rate, weight_decay=settings.weight_decay), generator=g,
        test=(data.x_test, data.labels_test), callback=callback, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, check_finite=check_finite, on_resume=on_resume,
        checkpoint_info=None if checkpoint is None else checkpoint_record("digits", seed, settings, checkpoint_info),
    )  # fmt: skip
    state = history.model_state
    predictions = predict(model, params, data.x_test, state=state)
    train_correct = int((predict(model, params, data.x_train, state=state) == data.labels_train).sum())
    errors = int((predictions != data.labels_test).sum())
    return DigitsResult(
        seed=seed, settings=settings, train_accuracy=train_correct / len(data.labels_train),
        test_accuracy=1 - errors / len(data.labels_test), test_errors=errors,
        train_loss=history.train_loss[-1] if history.epochs else float("nan"),
        test_loss=history.test_loss[-1] if history.epochs else float("nan"),
        seconds=time.perf_counter() - start, params=params, history=history, data=data, model_state=state,
        predictions=predictions.cpu(),
    )  # fmt: skip


def describe(settings: DigitsSettings) -> str:
    """The header's words for a run of ``settings``."""
    w = settings.width
    shift = f"random shifts of up to {settings.shift} pixel{'s' if settings.shift > 1 else ''}" if settings.shift \
        else "no shifts"
    return (f"scikit-learn's 8×8 digits, a stratified {1 - settings.test_fraction:.0%}/{settings.test_fraction:.0%} "
            f"split per seed; a CNN (3×3 convolutions of {w}, {w}, {2 * w} channels with batch norm, two max-pools, "
            f"dropout {settings.dropout:g}, linear), {shift}; AdamW, weight decay {settings.weight_decay:g}\n"
            f"{settings.epochs} epoch{'' if settings.epochs == 1 else 's'}, batch size {settings.batch_size}, "
            f"a one-cycle rate peaking at lr {settings.lr:g}")


def _plots(folder: Path, results: list[DigitsResult], settings: DigitsSettings) -> list[str]:
    from .plots import plot_confusion, plot_history, plot_predictions, plot_seed_spread, save_figure

    if len(results) > 1:
        seeds = ",".join(str(r.seed) for r in results) if len(results) <= 5 else f"{len(results)} seeds"
        figures = {"seeds.png": plot_seed_spread([r.history for r in results],
                                                 title=f"Digits CNN: test set, seeds {seeds}")}
    else:
        result = results[0]
        figures = {
            "predictions.png": plot_predictions(result.data.images_test, result.data.labels_test.cpu(),
                                                result.predictions, title=f"Test images of seed {result.seed}"),
            "confusion.png": plot_confusion(result.data.labels_test.cpu(), result.predictions,
                                            title=f"Seed {result.seed}'s test set: {result.test_accuracy:.1%} "
                                                  "correct"),
            "history.png": plot_history(result.history, title=f"Digits CNN, seed {result.seed}"),
        }
    for filename, figure in figures.items():
        save_figure(figure, folder / filename)
    return list(figures)


def _compare_torch(seed: int, settings: DigitsSettings) -> Comparison:
    from .digits_torch import compare_with_torch

    return compare_with_torch(seed, settings)


COLUMNS = (Column("train_accuracy", "train acc", 9, "percent"), Column("test_accuracy", "test acc", 8, "percent"),
           Column("test_errors", "test errors", 11, "count"), Column("train_loss", "train loss", 10, "loss"),
           Column("test_loss", "test loss", 9, "loss"), Column("seconds", "time", 8, "seconds"))

TASK = TrainingTask(
    name="digits",
    description="scikit-learn's 8×8 handwritten digits (1,797 images, a stratified 80/20 split per seed), a small "
                "CNN with batch norm, AdamW with a one-cycle rate and random 1-pixel shifts",
    defaults=DEFAULTS,
    flags=("epochs", "batch_size", "lr", "weight_decay", "dropout", "device", "dtype"),
    run=run_digits,
    summarize=summarize_runs,
    plots=_plots,
    compare_torch=_compare_torch,
    describe=describe,
    columns=COLUMNS,
)  # fmt: skip
