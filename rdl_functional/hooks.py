"""What :func:`~rdl_functional.fit` does between steps and epochs: small hooks over a :class:`Progress` record.

``fit`` is a short loop: batches, ``state, metrics = step(state, x, target)``, and after each step
and each epoch the hooks, in order. A hook is any object with some of these methods (each optional):

- ``on_step(progress)``: after every step; ``progress.metrics["loss"]`` is the step's loss, a 0-dim
  tensor (reading it with ``.item()`` waits on the device: keep the tensor if you can);
- ``on_epoch(progress)``: after every epoch, once the history holds it; set ``progress.stop = True``
  to end training after this epoch;
- ``on_end(progress)``: once, after the last epoch; return a :class:`~rdl_functional.TrainState` to make
  it the one ``fit`` returns (early stopping returns its best), or ``None``.

``progress.state`` is the state after the step: ``fit`` applies the step to private copies in place,
so clone what you keep (``rf.tree_map(torch.clone, progress.state.params)``); the next step changes it.
fit's own behaviours are hooks of this kind: the finite check, the history, checkpoints, the callback
and :class:`EarlyStopping`; yours run after fit's own, in the order given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from .step import TrainState
from .tree import tree_leaves, tree_map

__all__ = ["EarlyStopping", "NonFiniteLoss", "Progress", "early_stopping"]


@attrs.define(eq=False)
class Progress:
    """Where :func:`~rdl_functional.fit`'s loop is: what each hook reads (and ``stop``, which one may set).

    Attributes:
        epoch: the epoch running, or just ended (from 1).
        steps: steps taken in all; ``step_in_epoch``: steps of this epoch taken.
        rows: rows of this epoch trained on so far.
        metrics: the last step's metrics (``{"loss": 0-dim tensor}``).
        batch: the last step's ``(x, target)``.
        history: the :class:`~rdl_functional.History` so far.
        order: the epoch's shuffle of the rows (``(n,)`` int64) for ``(x, target)`` tensors, ``None``
            for an iterable of batches.
        stop: set to ``True`` to stop after the current epoch.
        raw: the state as the step returned it; with fit's in-place optimizer its ``opt_state`` is
            the runner itself and its ``step`` the count at the start: read :attr:`state` instead.
    """

    raw: TrainState = attrs.field(repr=False)
    history: Any = attrs.field(repr=False)
    epoch: int = 0
    steps: int = 0
    step_in_epoch: int = 0
    rows: int = 0
    metrics: dict[str, Tensor] = attrs.field(factory=dict, repr=False)
    batch: tuple[Tensor, Tensor] | None = attrs.field(default=None, repr=False)
    order: Tensor | None = attrs.field(default=None, repr=False)
    stop: bool = False

    def advance(self, state: TrainState, metrics: dict[str, Tensor], rows: int, batch: tuple[Tensor, Tensor]) -> None:
        """One step taken: ``state`` and ``metrics`` after it, on ``batch``; ``rows`` of the epoch done."""
        self.raw, self.metrics, self.rows, self.batch = state, metrics, rows, batch
        self.steps += 1
        self.step_in_epoch += 1

    @property
    def state(self) -> TrainState:
        """The :class:`~rdl_functional.TrainState` now (its ``opt_state`` a copy; its params fit's own)."""
        live = self.raw.opt_state
        if not hasattr(live, "state"):  # a state of its own, not the in-place runner's
            return self.raw
        return attrs.evolve(self.raw, opt_state=live.state(), step=torch.tensor(self.steps, dtype=torch.int64))


class NonFiniteLoss(FloatingPointError):
    """Raised by :func:`fit` when a step's loss is NaN or infinite; ``epoch`` and ``step`` (1-based) say where."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step


def _check_losses(losses: list[Tensor], epoch: int, first: int, batch_size: int, checkpoint: Any,
                  check: bool, who: str = "fit") -> None:
    """Raise :class:`NonFiniteLoss` at the first step of ``losses`` whose loss is not finite; empties the list.

    One read of the device for the lot (here, at an epoch's end or before a checkpoint), not one per step.
    """
    if not check or not losses:
        return
    bad = ~torch.isfinite(torch.stack([value.detach().reshape(()) for value in losses]))
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        value = float(losses[index])
        step = first // batch_size + index + 1
        raise NonFiniteLoss(f"{who}: the loss is {value} at epoch {epoch}, step {step}: training stopped"
                            f"{_kept(checkpoint)}. "
                            "Check the data and the initial params for NaN or inf, and try a smaller learning "
                            "rate (or pass check_finite=False to train on regardless)", epoch, step)
    losses.clear()


def _check_params_finite(params: Any, epoch: int, steps: int, checkpoint: Any) -> None:
    """A checkpoint is never written over the last good one with params that are not finite."""
    leaves = [leaf for leaf in tree_leaves(params) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
    if leaves and not bool(torch.stack([torch.isfinite(leaf).all() for leaf in leaves]).all()):
        raise NonFiniteLoss(f"fit: the params are no longer finite after step {steps} (in epoch {epoch}), though "
                            f"the losses were: training stopped{_kept(checkpoint)}", epoch, 0)


def _kept(checkpoint: Any) -> str:
    """What the error says of the checkpoint: only what is true of it."""
    if checkpoint is None:
        return ""
    if not os.path.exists(checkpoint):
        return f"; no checkpoint was written to {str(checkpoint)!r} yet"
    return f"; the checkpoint {str(checkpoint)!r} holds the last good state"


class _Finite:
    """The finite check: each step's loss kept (no host sync per step), all checked at the epoch's end and
    before each checkpoint, raising :class:`NonFiniteLoss` with the epoch and the step."""

    def __init__(self, checkpoint: Any) -> None:
        self.checkpoint, self.losses, self.first = checkpoint, [], 0

    def on_step(self, progress: Progress) -> None:
        if not self.losses:
            self.first = progress.step_in_epoch - 1  # the step (from 0) of losses[0]
        self.losses.append(progress.metrics["loss"])

    def check(self, progress: Progress) -> None:
        _check_losses(self.losses, progress.epoch, self.first, 1, self.checkpoint, True)

    on_epoch = check


class _Record:
    """The history: each epoch's measurements (``measure(progress) -> History``), and the model's state."""

    def __init__(self, measure: Callable[[Progress], Any]) -> None:
        self.measure = measure

    def on_epoch(self, progress: Progress) -> None:
        progress.history = self.measure(progress)


class _Callback:
    """``callback(epoch, params, history)`` after each epoch, with a copy of the params (they change in place)."""

    def __init__(self, callback: Callable[[int, Any, Any], None]) -> None:
        self.callback = callback

    def on_epoch(self, progress: Progress) -> None:
        self.callback(progress.epoch, tree_map(torch.clone, progress.raw.params), progress.history)


class _OnStep:
    """A function ``on_step(progress)`` as a hook."""

    def __init__(self, on_step: Callable[[Progress], None]) -> None:
        self.on_step = on_step


class _Checkpoints:
    """A checkpoint every ``every`` steps inside an epoch, at an epoch's end when a multiple of ``every`` steps
    is reached, and at the run's last epoch: the state (``progress.state``), the loop's place and the history.
    Written by rank 0 only, once the losses and params are checked finite (``finite``, or ``None``)."""

    def __init__(self, path: Any, every: int, epochs: int, epoch_rows: int, settings: dict[str, Any],
                 finite: _Finite | None, rank: int, keeps_opt_state: bool, keeps_model_state: bool) -> None:
        self.path, self.every, self.epochs, self.epoch_rows, self.settings = path, every, epochs, epoch_rows, settings
        self.finite, self.rank = finite, rank
        self.keeps = keeps_opt_state, keeps_model_state

    def on_step(self, progress: Progress) -> None:
        if progress.steps % self.every == 0 and progress.rows < self.epoch_rows:  # inside an epoch
            self._save(progress, progress.epoch - 1, progress.rows, progress.order)

    def on_epoch(self, progress: Progress) -> None:
        if progress.steps % self.every == 0 or progress.epoch == self.epochs:
            self._save(progress, progress.epoch, 0, None)

    def _save(self, progress: Progress, epochs_done: int, position: int, order: Tensor | None) -> None:
        from .checkpoint import _HISTORY, Checkpoint, write_checkpoint

        if self.finite is not None:
            self.finite.check(progress)
            _check_params_finite(progress.raw.params, epochs_done + (position > 0), progress.steps, self.path)
        if self.rank != 0:  # every rank holds the same state; one writes it (and every rank resumes from it)
            return
        state = progress.state
        write_checkpoint(self.path, Checkpoint(
            params=state.params, opt_state=state.opt_state if self.keeps[0] else None,
            model_state=state.model_state if self.keeps[1] else None, generator_state=state.generator,
            order=order, epochs_done=epochs_done, position=position, steps=progress.steps,
            history={name: list(getattr(progress.history, name)) for name in _HISTORY}, settings=self.settings,
        ))


@attrs.define(eq=False)
class EarlyStopping:
    """Stop when a loss has not improved for ``patience`` epochs, and hand back the best epoch's state.

    ``fit(..., patience=N)`` adds one; pass one in ``hooks=`` to choose what it watches. After each
    epoch it reads ``history.<monitor>[-1]`` (``"test_loss"`` where ``fit`` measures held-out data,
    else ``"train_loss"``); an improvement is a value below the best by more than ``min_delta``.
    Each new best is cloned (the loop's own tensors change at the next step); at the end ``fit``
    returns the best epoch's params, its ``history.model_state`` and ``opt_state``, and
    ``history.best_epoch`` names it (the history itself runs to the last epoch trained).

    Attributes:
        patience: epochs without improvement before stopping, ≥ 1.
        monitor: the history's list to watch (``None``: as above).
        min_delta: the smallest decrease that counts, ≥ 0.
        best_epoch, best: the best epoch so far and its value (``None`` before the first epoch).
    """

    patience: int
    monitor: str | None = None
    min_delta: float = 0.0
    best_epoch: int | None = None
    best: float | None = None
    _state: TrainState | None = attrs.field(default=None, repr=False)
    _run: Progress | None = attrs.field(default=None, repr=False, eq=False)

    def on_epoch(self, progress: Progress) -> None:
        if progress is not self._run:  # another fit: what an earlier run found best is not this run's
            self._run, self.best, self.best_epoch, self._state = progress, None, None, None
        name = self.monitor or ("test_loss" if progress.history.test_loss else "train_loss")
        values = getattr(progress.history, name, None)
        if not values:
            raise ValueError(f"early_stopping: the history holds no {name} to watch (fit measures it after each "
                             "epoch with record_history=True; test_* need held-out data: test= or validation=)")
        if self.best is None or values[-1] < self.best - self.min_delta:
            self.best, self.best_epoch = values[-1], progress.epoch
            state = progress.state
            self._state = attrs.evolve(state, **{name: tree_map(torch.clone, getattr(state, name))
                                                 for name in ("params", "opt_state", "model_state")})
        elif progress.epoch - self.best_epoch >= self.patience:
            progress.stop = True

    def on_end(self, progress: Progress) -> TrainState | None:
        progress.history = attrs.evolve(progress.history, best_epoch=self.best_epoch)
        return self._state


def early_stopping(patience: int, *, monitor: str | None = None, min_delta: float = 0.0) -> EarlyStopping:
    """A hook that stops ``fit`` after ``patience`` epochs without improvement and returns the best epoch's state.

    ``monitor`` is the history's list to watch (``"test_loss"`` when ``fit`` has held-out data, else
    ``"train_loss"`` by default; ``"test_accuracy"`` would need a rise, which this does not watch).

    >>> import rdl_functional as rf
    >>> x, labels = rf.disc_dataset(200, 0)
    >>> model = rf.compose(rf.linear(2, 8), rf.relu, rf.linear(8, 2))
    >>> stop = rf.early_stopping(2)
    >>> params, history = rf.fit(model, rf.cross_entropy_loss, model.init(0), x, labels, epochs=50, batch_size=50,
    ...                          optimizer=rf.sgd(3.0), generator=0, validation=0.2, hooks=[stop])
    >>> history.best_epoch == stop.best_epoch and history.epochs - history.best_epoch <= 2
    True
    """
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"early_stopping: patience must be an int ≥ 1 (epochs without improvement), got "
                         f"{patience!r}")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
        raise ValueError(f"early_stopping: min_delta must be a number ≥ 0, got {min_delta!r}")
    if monitor is not None and not (isinstance(monitor, str) and monitor.endswith("_loss")):
        raise ValueError(f"early_stopping: monitor must name a loss of the history ('train_loss' or 'test_loss'), "
                         f"got {monitor!r}")
    return EarlyStopping(patience, monitor, float(min_delta))
