"""Training: minibatch gradient descent over a data set, and the metrics it records."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor

from ._files import check_writable
from ._random import as_generator
from .autodiff import value_and_grad
from .distributed import broadcast_params, world
from .hooks import (
    EarlyStopping,
    NonFiniteLoss,
    Progress,
    _Callback,
    _Checkpoints,
    _Finite,
    _OnStep,
    early_stopping,
)
from .layers import Layer, Params
from .losses import Loss, check_loss
from .metrics import Evaluation, check_fits, check_task, infer_task, measure, predictions, task_of_outputs
from .optim import _FACTORIES, Optimizer, Schedule, sgd, sgd_step
from .optim.base import _Running
from .optim.schedules import _check_lr, _rate
from .stateful import State, StatefulLayer
from .step import TrainState, TrainStep
from .tree import Tree, tree_difference, tree_flatten, tree_leaves, tree_map

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = ["History", "NonFiniteLoss", "accuracy", "evaluate", "fit", "predict"]

StepFunction = Callable[[Tree, Tree, float], Tree]
"""``(params, grads, lr) -> new params``, as :func:`~rdl_functional.sgd_step`."""


@attrs.frozen
class History:
    """What :func:`fit` measured at the end of each epoch, one entry per epoch.

    Losses are means over the whole set. What else is measured fits the task
    (:data:`~rdl_functional.TASKS`, given to ``fit`` as ``task=`` or inferred from
    the loss, the target and the model's output; :mod:`rdl_functional.metrics`
    has the rules), and ``task`` names it:

    - a classification, or a binary task (one logit or probability): ``*_accuracy``,
      the fraction of rows predicted right; ``*_rmse`` and ``*_r2`` stay empty;
    - a regression: ``*_rmse`` and ``*_r2`` (the coefficient of determination);
      ``*_accuracy`` stays empty.

    ``test_*`` are empty when ``fit`` had no test data; everything is empty, and
    ``task`` ``None``, when nothing was measured. ``opt_state`` is the optimizer's state at the
    end of the run (``None`` for a step function such as ``sgd_step``), to continue from:
    ``fit(..., optimizer=opt, opt_state=history.opt_state)``. ``model_state`` is a
    stateful model's state (batch norm's running statistics) after the last step,
    ``None`` for a plain model: evaluate with it, or continue with
    ``fit(..., model_state=history.model_state)``. ``best_epoch`` is the epoch whose
    state ``fit`` returned when early stopping chose it (``patience=``), else ``None``.
    """

    train_loss: tuple[float, ...] = ()
    train_accuracy: tuple[float, ...] = ()
    test_loss: tuple[float, ...] = ()
    test_accuracy: tuple[float, ...] = ()
    opt_state: Tree | None = attrs.field(default=None, eq=False, repr=False)
    model_state: State | None = attrs.field(default=None, eq=False, repr=False)
    train_rmse: tuple[float, ...] = ()
    train_r2: tuple[float, ...] = ()
    test_rmse: tuple[float, ...] = ()
    test_r2: tuple[float, ...] = ()
    task: str | None = None
    best_epoch: int | None = None

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    def _append(self, train: Evaluation, test: Evaluation | None) -> History:
        grown = {f"{kind}_{name}": (*getattr(self, f"{kind}_{name}"), value)
                 for kind, measured in (("train", train), ("test", test)) if measured is not None
                 for name, value in measured._measured().items()}
        return attrs.evolve(self, task=train.task, **grown)


def _forward(who: str, model: Layer | StatefulLayer, params: Params, x: Tensor, state: State | None) -> Tensor:
    """The model's output on ``x``, evaluating: a stateful model runs with ``train=False`` on ``state``."""
    if isinstance(model, StatefulLayer):
        if state is None:
            raise ValueError(f"{who}: {model.name} is a StatefulLayer, which evaluates with its state: pass "
                             "state=history.model_state (or model.init_state() before any training)")
        return model.apply(params, state, x, train=False)[0]
    if state is not None:
        raise ValueError(f"{who}: state goes with a StatefulLayer; {model.name} is a plain Layer, which has none")
    return model.apply(params, x)


def predict(model: Layer | StatefulLayer, params: Params, x: Tensor, *, state: State | None = None,
            task: str | None = None) -> Tensor:
    """The model's predictions on ``x``, as fit the task (:data:`~rdl_functional.TASKS`):

    - ``"classification"`` (the default for several outputs): the index of the largest output, ``(batch,)`` int64;
    - ``"binary_logit"``, ``"binary_probability"``: 1 where the output is above 0 (a logit) or 0.5
      (a probability), else 0, int64: ``(batch,)`` for one output, ``(batch, labels)`` for several;
    - ``"regression"``: the output itself.

    A model with one output per row needs ``task``: the output alone does not tell a logit
    from a probability or a value (``rf.fit`` returns the task it measured as ``history.task``).
    A stateful model (dropout, batch norm) is evaluated (``train=False``) with ``state``.

    >>> import rdl_functional as rf
    >>> x, labels = rf.disc_dataset(4, 0)
    >>> rf.predict(rf.linear(2, 1), rf.linear(2, 1).init(0), x, task="binary_logit").shape
    torch.Size([4])
    """
    check_task("predict", task)
    pred = _forward("predict", model, params, x, state)
    return predictions(pred, task_of_outputs("predict", pred, task))


def accuracy(model: Layer | StatefulLayer, params: Params, x: Tensor, labels: Tensor, *,
             state: State | None = None, task: str | None = None) -> float:
    """The fraction of rows of ``x`` whose prediction (:func:`predict`'s) equals ``labels``.

    ``labels``: int64 classes ``(batch,)`` (or one-hot rows) for a classification, whose task is
    inferred from several outputs; 0 and 1, ``(batch,)`` or ``(batch, 1)``, for a binary task, which a
    one-output model must name, ``task="binary_logit"`` or ``"binary_probability"`` (``history.task``
    after ``rf.fit``). A regression has no accuracy: :func:`evaluate` measures its RMSE and R².
    """
    check_task("accuracy", task)
    _check_rows("accuracy", x, labels)
    pred = _forward("accuracy", model, params, x, state)
    task = task or infer_task("accuracy", None, pred, labels)
    if task == "regression":
        raise ValueError("accuracy: a regression has no accuracy; rf.evaluate measures its RMSE and R² (or pass the "
                         "task the outputs serve, if not a regression)")
    check_fits("accuracy", task, pred, labels)
    return measure(pred, labels, task)["accuracy"].item()


def evaluate(model: Layer | StatefulLayer, loss: Loss, params: Params, x: Tensor, target: Tensor, *,
             state: State | None = None, task: str | None = None) -> Evaluation:
    """The loss of ``params`` on a whole data set, and the metrics that fit the task, as an :class:`Evaluation`.

    ``task`` (:data:`~rdl_functional.TASKS`) is inferred from the loss, the target and the
    model's output where not given (:mod:`rdl_functional.metrics` has the rules): a
    classification's accuracy compares the largest output with each row's class (``target``
    itself when it holds class indices, its argmax when it is one-hot); a binary task's
    compares the output above 0 (a logit, with ``bce_with_logits_loss``) or 0.5 (a
    probability) with the target above 0.5; a regression has RMSE and R² instead.
    ``loss, accuracy = rf.evaluate(...)`` unpacks a task with an accuracy.
    A stateful model is evaluated (``train=False``) with ``state``.

    >>> import rdl_functional as rf, torch
    >>> x = torch.linspace(0, 1, 8).reshape(8, 1)
    >>> result = rf.evaluate(rf.linear(1, 1), rf.mse_loss, {"weight": torch.ones(1, 1), "bias": torch.zeros(1)}, x,
    ...                      2 * x)
    >>> result.task, round(result.rmse, 4), round(result.r2, 4), result.accuracy
    ('regression', 0.5976, 0.1667, None)
    """
    check_task("evaluate", task)
    check_loss("evaluate", loss)
    _check_rows("evaluate", x, target)
    pred = _forward("evaluate", model, params, x, state)
    task = task or infer_task("evaluate", loss, pred, target)
    check_fits("evaluate", task, pred, target)
    value = loss.apply(pred, target).item()
    return Evaluation(value, task, **{name: metric.item() for name, metric in measure(pred, target, task).items()})


def _task_of_run(who: str, run: Callable[[Tensor], Tensor], loss: Loss, x: Tensor, target: Tensor,
                 test: tuple[Tensor, Tensor] | None, task: str | None, rows: int = 1) -> str:
    """The task the history measures, found and checked before the first step: ``run`` (the model, evaluating) on
    the first row of the training and the test set, and the loss on the test set's (the training set's meets it at
    the first step), so that a model, target or test set that the loss or the metrics cannot take fails now, never
    after an epoch of training. ``rows``: 2 for a stack of models, whose rows are ``x[:, i]``."""
    first = (slice(None),) * (rows - 1) + (slice(0, 1),)
    with torch.no_grad():
        try:
            pred = run(x[first])
        except (TypeError, ValueError) as error:
            if x.dim() != rows:
                raise
            # A 1-D x: its rows are numbers, and a layer that reads features sees one example of one feature.
            raise type(error)(f"{error} ({who}: x has shape {tuple(x.shape)}, so each of its {x.shape[-1]} rows is "
                              "one number; for rows of one feature, pass x[:, None])") from None
        task = task or infer_task(who, loss, pred, target, rows)
        check_fits(who, task, pred, target, rows)
        if test is not None:
            pred = run(test[0][first])
            check_fits(f"{who}: test", task, pred, test[1], rows)
            try:
                loss.apply(pred, test[1][first])
            except (TypeError, ValueError) as error:
                raise type(error)(f"{who}: test: {error} (on the test set's first row)") from None
    return task


def _check_count(where: str, name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int ≥ {minimum}, got {value!r}")


def _check_rows(where: str, x: Tensor, target: Tensor) -> None:
    for name, value in (("x", x), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:  # the mean loss and every metric of no rows is NaN
        raise ValueError(f"{where}: x has no rows (shape {tuple(x.shape)}); expected (rows, ...) with rows ≥ 1")
    if x.shape[:1] != target.shape[:1]:
        raise ValueError(f"{where}: x has {x.shape[0]} rows but target has {target.shape[0]}")


def fit(
    model: Layer | StatefulLayer,
    loss: Loss,
    params: Params,
    x: Tensor | Iterable[tuple[Tensor, Tensor]],
    target: Tensor | None = None,
    *,
    epochs: int,
    batch_size: int | None = None,
    lr: float | Schedule | None = None,
    generator: torch.Generator | int,
    test: tuple[Tensor, Tensor] | None = None,
    validation: float | tuple[Tensor, Tensor] | None = None,
    optimizer: Optimizer | StepFunction = sgd_step,
    opt_state: Tree | None = None,
    model_state: State | None = None,
    callback: Callable[[int, Params, History], None] | None = None,
    record_history: bool = True,
    task: str | None = None,
    compile: bool = False,
    capture: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_info: Any = None,
    check_finite: bool = True,
    on_resume: Callable[[Checkpoint], None] | None = None,
    drop_last: bool = False,
    patience: int | None = None,
    on_step: Callable[[Progress], None] | None = None,
    hooks: Sequence[Any] = (),
) -> tuple[Params, History]:
    """Train on minibatches; return the final params and the per-epoch history.

    A thin loop over the pure step (:func:`~rdl_functional.train_step`)::

        for epoch in 1..epochs:
            for x, target in the epoch's batches:
                state, metrics = step(state, x, target)
                hooks' on_step(progress)
            hooks' on_epoch(progress)          # finite check, history, early stopping, checkpoint, callback, yours

    The batches: from ``(x, target)`` tensors, each epoch draws a permutation
    of the rows from ``generator`` and steps through it ``batch_size`` rows at
    a time (the last batch may be shorter, or dropped with ``drop_last=True``);
    from any other iterable of ``(x, target)`` batches (a
    ``torch.utils.data.DataLoader``, a list), each epoch iterates it once, as it
    is. After each epoch the loss and the task's metrics on the whole training
    set (and on held-out data, if given) are recorded. Pure: ``params``, ``x``
    and ``target`` are not changed, nothing global is read or written, and the
    same generator state gives the same params and history, bit for bit (a loop
    of ``train_step`` over the same batches gives the same bits). Prints nothing.

    Compile, capture and data-parallel are transforms of the step, chosen once
    before the loop: ``compile=True`` runs :func:`~rdl_functional.compiled_step`,
    ``capture=True`` the gradient as a CUDA graph, and a ``torch.distributed``
    group of several processes :func:`~rdl_functional.data_parallel`.

    Args:
        model: what to train.
        loss: what to minimize, ``loss(model(params, x), target)``.
        params: the starting params (not changed).
        x: ``(n, features)`` inputs, or an iterable of ``(x, target)`` batches (then
            ``target``, ``batch_size`` and ``drop_last`` stay unset; the history is
            measured on the rows each epoch trained on, kept for the epoch; a one-pass
            iterator serves one epoch only).
        target: ``(n, ...)``, what ``loss`` compares with.
        epochs: passes over the data, ≥ 0.
        batch_size: rows per step, ≥ 1 (for tensors).
        drop_last: leave out each epoch's last batch when it is shorter than ``batch_size``.
        lr: the learning rate, finite and ≥ 0, or a schedule: a function of the
            step count (0, 1, ...) such as :func:`~rdl_functional.linear_schedule`;
            for a step function such as ``sgd_step`` only: an
            :class:`~rdl_functional.Optimizer` carries its own.
        generator: a ``torch.Generator`` (advanced) or an ``int`` seed: each epoch's
            shuffle is drawn from it, then each step's random layers (dropout) draw
            their masks from it, in order.
        test: optional ``(x_test, target_test)`` to measure after every epoch (``history.test_*``).
        validation: held-out data measured as ``test`` is: a fraction in (0, 1) of the rows of
            ``x``, its last rows, held out of training; or ``(x_val, target_val)``.
        optimizer: an :class:`~rdl_functional.Optimizer` (``rf.adam(1e-3)``,
            ``rf.sgd(0.1, momentum=0.9)``, a ``rf.chain``), or a step function
            ``(params, grads, lr) -> params``; :func:`~rdl_functional.sgd_step` by default.
        opt_state: the optimizer's state to start from (``history.opt_state``
            of an earlier run, or ``rf.load`` of a saved one); a fresh
            ``optimizer.init(params)`` by default.
        model_state: for a :class:`~rdl_functional.StatefulLayer` (dropout, batch
            norm), its state to start from (``history.model_state`` of an earlier
            run); ``model.init_state()`` in the params' dtype by default. Training
            steps run with ``train=True``, the history's measurements with
            ``train=False`` on the state reached, which comes back as
            ``history.model_state``.
        callback: called as ``callback(epoch, params, history)`` after each
            epoch (epochs count from 1), e.g. to show progress.
        record_history: measure the loss and the task's metrics after each epoch (a
            forward pass over the training set, and the held-out set if given);
            with ``False`` the history stays empty and training runs alone.
            The measurement is a real cost, not bookkeeping: on the seed task
            it adds a tenth to a fifth of the training time at batch 100 and about
            half at batch 1000, where an epoch is one step (docs/performance.md
            has the figures). The step losses cannot stand in for it: the
            params change during an epoch, so their mean is another number.
        task: what the outputs are, and so what the history measures (:data:`~rdl_functional.TASKS`):
            ``"classification"`` and the binary ``"binary_logit"`` (threshold 0) and
            ``"binary_probability"`` (threshold 0.5) record accuracy, ``"regression"``
            RMSE and R². Inferred where not given, from the loss, the target and the
            model's output (:mod:`rdl_functional.metrics` has the rules: with
            ``bce_with_logits_loss``, logits; one output against 0/1 targets otherwise,
            a probability; classes for int labels or one-hot targets; else a regression),
            before the first step, on the first row of each set, so that data the metrics
            cannot measure fails at once; the task used comes back as ``history.task``.
        compile: run each step through :func:`~rdl_functional.compiled_step`
            (``torch.compile``; plain SGD only). The first step compiles, which
            takes tens of seconds on a CPU; the results equal eager training
            to float rounding, not bit for bit.
        capture: run each step's ``value_and_grad`` as a CUDA graph
            (:func:`~rdl_functional.capture`): recorded at the first step of
            each batch shape, then replayed with one launch; the optimizer's
            foreach kernels run after it as usual, so any optimizer and
            schedule works. A plain model, with ``x`` and the params on a CUDA
            device.
        (data-parallel) Started in a ``torch.distributed`` process group of
            several processes (``torchrun``, ``rdl-train --nproc N``), ``fit``
            trains data-parallel by itself: each process takes its shard of every
            global batch, and the result equals one process's to float rounding,
            batch norm and dropout included (docs/data-parallel.md). First, every
            process checks that all train the same run (the settings a checkpoint
            records, gathered from each): where one differs, every process raises
            the same ``ValueError`` naming the first setting that does.
        checkpoint: a file to write the run's state to every ``checkpoint_every``
            steps (once an epoch by default) and at the end, each write
            replacing the last whole or not at all: the :class:`~rdl_functional.TrainState`
            (:func:`~rdl_functional.load_state` reads it), the loop's place and the history.
            When the file exists, ``fit``
            resumes from it: called again with the same arguments after a
            crash or a kill, it ends with the params and history of the run never
            interrupted, bit for bit. A checkpoint of another run (another model,
            data, start, rate, ...) is refused with the difference named. Called
            with more ``epochs`` (or fewer, not fewer than done), it goes on with
            the same run extended when the rate of every step taken is unchanged
            (a constant rate, or a schedule that does not depend on the total);
            a schedule tied to the total (a decay to the last step) is refused
            with the reason. :func:`~rdl_functional.read_checkpoint` reads one.
            ``(x, target)`` tensors only.
        checkpoint_every: steps between checkpoints, ≥ 1.
        on_resume: called with the :class:`~rdl_functional.Checkpoint` once ``fit``
            has accepted it to resume from, before the first step (``rdl-train``
            says there where the run resumes).
        checkpoint_info: JSON-able data recorded in the checkpoint's settings,
            which a resumed run must match (``rdl-train`` records its settings).
            A step function is known by its code, so one that carries values
            (a closure such as ``make(1.0)``, a lambda, a ``functools.partial``,
            a callable object) is refused with ``checkpoint`` unless
            ``checkpoint_info`` names it and its values.
        check_finite: stop at a loss that is NaN or infinite, raising
            :class:`NonFiniteLoss` with its epoch and step. The losses are
            checked together at each epoch's end (and before each checkpoint,
            which is never written with params that are not finite), so there is
            no host sync per step.
        patience: stop once the held-out loss (the training loss without held-out
            data) has not improved for ``patience`` epochs, and return the best
            epoch's params (:func:`~rdl_functional.early_stopping`; ``history.best_epoch``).
        on_step: called as ``on_step(progress)`` after every step (a
            :class:`~rdl_functional.Progress`: ``progress.metrics["loss"]``, ``progress.steps``, ...).
        hooks: objects with some of ``on_step(progress)``, ``on_epoch(progress)`` and
            ``on_end(progress)``, run after fit's own (:mod:`rdl_functional.hooks` has the protocol).

    With an :class:`~rdl_functional.Optimizer` or the default ``sgd_step``,
    the step applies the optimizer to private copies of the params and its
    state in place (the same kernels as ``optimizer.step``, so the same bits):
    a new tree per step would cost a fresh allocation per parameter per step,
    and page faults with it, for nothing the caller can see.

    >>> import rdl_functional as rf
    >>> x, labels = rf.disc_dataset(200, 0)
    >>> model = rf.compose(rf.linear(2, 8), rf.relu, rf.linear(8, 2))
    >>> params, history = rf.fit(model, rf.cross_entropy_loss, model.init(0), x, labels,
    ...                          epochs=3, batch_size=50, lr=0.1, generator=0)
    >>> history.epochs, len(history.train_accuracy), history.test_loss
    (3, 3, ())
    """
    _check_count("fit", "epochs", epochs, 0)
    data, test = _batches_of(x, target, batch_size, drop_last, validation, test, epochs)
    params, g = _detached(params), as_generator(generator, "fit")
    check_loss("fit", loss)
    model_state = _model_state_of(model, params, data, model_state, compile)
    if capture:
        _check_capture(model, data, params, compile)
    check_task("fit", task)
    measure = _Measure(model, loss, data, test, record_history, params, model_state, task)
    rank, size = world()
    if size > 1:  # data-parallel: the same params everywhere, each rank its shard of every global batch
        params = _data_parallel_start(model, loss, optimizer, lr, params, opt_state, model_state, data, test,
                                      epochs, generator, record_history, checkpoint_info, compile, capture,
                                      check_finite, checkpoint, checkpoint_every, measure.task, size)
    resumed = settings = None
    if checkpoint is not None:
        resumed, settings = _resumed(model, loss, optimizer, lr, params, opt_state, model_state, data, test, epochs,
                                     generator, record_history, checkpoint_info, compile, checkpoint, measure.task)
        if resumed is not None and on_resume is not None:
            on_resume(resumed)
    elif checkpoint_every is not None or checkpoint_info is not None or on_resume is not None:
        raise ValueError("fit: checkpoint_every, checkpoint_info and on_resume go with checkpoint=PATH")
    step, state = _step_and_state(model, loss, optimizer, lr, params, opt_state, model_state, g, resumed, compile,
                                  capture, rank, size, data)
    finite = _Finite(checkpoint) if check_finite else None
    hooks = [finite, measure, *(_early(patience, record_history, checkpoint)),
             _checkpoints(checkpoint, checkpoint_every, epochs, data, settings, finite, rank, optimizer, model),
             _Callback(callback) if callback is not None else None, _OnStep(on_step) if on_step else None, *hooks]
    step_hooks = [hook.on_step for hook in hooks if hasattr(hook, "on_step")]
    epoch_hooks = [hook.on_epoch for hook in hooks if hasattr(hook, "on_epoch")]
    progress = Progress(state, measure.start(resumed), epoch=resumed.epochs_done if resumed else 0,
                        steps=int(state.step))
    for epoch in range(progress.epoch + 1, epochs + 1):
        state, progress.order, progress.step_in_epoch, batches = data.epoch(state, resumed)
        progress.epoch, progress.raw, resumed = epoch, state, None
        for rows, x_batch, target_batch in batches:
            state, metrics = step(state, x_batch, target_batch)
            progress.advance(state, metrics, rows, (x_batch, target_batch))
            for on_step_hook in step_hooks:
                on_step_hook(progress)
        for on_epoch_hook in epoch_hooks:
            on_epoch_hook(progress)
        if progress.stop:
            break
    return _result(progress, hooks, generator, optimizer, model)


def _batches_of(x: Any, target: Any, batch_size: Any, drop_last: Any, validation: Any, test: Any,
                epochs: int) -> tuple[_Tensors | _Iterable, tuple[Tensor, Tensor] | None]:
    """What the loop draws its batches from, and the held-out data (``test`` or ``validation``), checked."""
    if test is not None and validation is not None:
        raise ValueError("fit: test= and validation= both give held-out data, measured as history.test_*; pass one")
    if not isinstance(drop_last, bool):
        raise TypeError(f"fit: drop_last must be True or False, got {type(drop_last).__name__}")
    fraction = isinstance(validation, float)
    if isinstance(x, Tensor):
        _check_count("fit", "batch_size", batch_size, 1)
        if target is None:
            raise ValueError("fit: target is missing: pass fit(model, loss, params, x, target, ...) with tensors, or "
                             "an iterable of (x, target) batches as x")
        _check_rows("fit", x, target)
        x, target = x.detach(), target.detach()  # data that requires grad would grow a graph through every step
        if fraction:
            x, target, test = _split(x, target, validation)
        elif validation is not None:
            test = validation
        data: _Tensors | _Iterable = _Tensors(x, target, batch_size, drop_last)
        if drop_last and data.per_epoch == 0:
            raise ValueError(f"fit: drop_last=True with {x.shape[0]} rows in batches of {batch_size} leaves no batch; "
                             "use a smaller batch_size")
    else:
        for name, value, unset in (("target", target, None), ("batch_size", batch_size, None),
                                   ("drop_last", drop_last, False)):
            if value is not unset:
                raise ValueError(f"fit: {name} goes with (x, target) tensors; an iterable of batches (a DataLoader) "
                                 f"makes its own batches (leave {name} out)")
        if fraction:
            raise ValueError("fit: validation as a fraction splits (x, target) tensors; with an iterable of batches, "
                             "pass validation=(x_val, target_val)")
        data = _Iterable.of(x, epochs)
    if test is not None:
        if not isinstance(test, (tuple, list)) or len(test) != 2:
            raise TypeError(f"fit: held-out data must be a pair (x, target) of tensors, got {type(test).__name__}")
        _check_rows("fit: test", *test)
        test = (test[0].detach(), test[1].detach())
    return data, test


def _split(x: Tensor, target: Tensor, fraction: float) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """The first rows to train on and the last ``fraction`` of them held out, as Keras' ``validation_split``."""
    n = x.shape[0]
    held = round(n * fraction) if 0 < fraction < 1 else 0
    if not 0 < held < n:
        raise ValueError(f"fit: validation={fraction!r} holds out {held} of {n} rows; expected a fraction in (0, 1) "
                         "that leaves at least one row on each side")
    return x[:-held], target[:-held], (x[-held:], target[-held:])


@attrs.frozen
class _Tensors:
    """Batches of ``(x, target)`` tensors: each epoch a shuffle drawn from the state's generator, then slices."""

    x: Tensor
    target: Tensor
    batch_size: int
    drop_last: bool

    @property
    def rows(self) -> int:
        """Rows trained on in an epoch."""
        n = self.x.shape[0]
        return n - n % self.batch_size if self.drop_last else n

    @property
    def per_epoch(self) -> int:
        return -(-self.rows // self.batch_size)

    def epoch(self, state: TrainState, resumed: Checkpoint | None) -> tuple[TrainState, Tensor, int, Iterator[Any]]:
        """``(state, order, steps done, batches)``: the epoch's shuffle (or the resumed one), and its batches as
        ``(rows done, x, target)``, each a slice (a view, no copy) of the shuffled data."""
        if resumed is not None and resumed.position:  # inside the epoch the checkpoint was written in
            order, first = resumed.order, resumed.position
        else:
            shuffler = torch.Generator()
            shuffler.set_state(state.generator)
            order, first = torch.randperm(self.x.shape[0], generator=shuffler), 0
            state = attrs.evolve(state, generator=shuffler.get_state())  # the masks are drawn after the shuffle
        on_device = order.to(self.x.device)  # drawn on the generator's device (the CPU), the same on every device
        x, target, size, n = self.x.index_select(0, on_device), self.target.index_select(0, on_device), \
            self.batch_size, self.x.shape[0]
        batches = ((min(start + size, n), x[start:start + size], target[start:start + size])
                   for start in range(first, self.rows, size))
        return state, order, first // size, batches


class _Iterable:
    """Batches from any iterable of ``(x, target)`` pairs, iterated once an epoch, as they come."""

    def __init__(self, source: Any) -> None:
        self.source, self.first = source, None

    @classmethod
    def of(cls, source: Any, epochs: int) -> _Iterable:
        # Not iter(source): a DataLoader draws its base seed from its generator at each iter().
        if not isinstance(source, Iterable):
            raise TypeError(f"fit: x must be a torch.Tensor (with target) or an iterable of (x, target) batches such "
                            f"as a DataLoader, got {type(source).__name__}")
        if isinstance(source, Iterator) and epochs > 1:
            raise ValueError(f"fit: x is a one-pass iterator ({type(source).__name__}), used up by the first of "
                             f"{epochs} epochs; pass a list of batches or a DataLoader, which can be iterated again")
        return cls(source)

    def epoch(self, state: TrainState, resumed: Any) -> tuple[TrainState, None, int, Iterator[Any]]:
        return state, None, 0, self._batches()

    def _batches(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        rows = 0
        for index, batch in enumerate(self.source):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
                shown = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else type(batch).__name__
                raise TypeError(f"fit: batch {index} of x is {shown}; an iterable of batches yields (x, target) "
                                "pairs of tensors (a DataLoader over a TensorDataset(x, target) does)")
            x, target = batch
            _check_rows(f"fit: batch {index}", x, target)
            if self.first is not None:  # the metrics' check, on the first batch, before its step
                self.first, check = None, self.first
                check(x, target)
            rows += x.shape[0]
            yield rows, x, target


class _Measure:
    """The history hook: after each epoch, the model's state and (with ``record``) the loss and the task's metrics
    on the training set (for an iterable, the rows the epoch trained on) and on the held-out set."""

    def __init__(self, model: Any, loss: Loss, data: _Tensors | _Iterable, test: Any, record: bool, params: Params,
                 model_state: State | None, task: str | None) -> None:
        self.model, self.loss, self.data, self.test, self.record = model, loss, data, test, record
        self.task, self.seen = task, []
        self.stateful = isinstance(model, StatefulLayer)
        if not record:
            return
        if isinstance(data, _Iterable):  # the rows each epoch trains on, kept for its measurement
            self.on_step = lambda progress: self.seen.append(progress.batch)

        def find_task(x: Tensor, target: Tensor) -> None:  # before any step: data the metrics cannot take fails now
            self.task = _task_of_run("fit", lambda rows: _forward("fit", model, params, rows, model_state), loss, x,
                                     target, test, task)

        if isinstance(data, _Tensors):
            find_task(data.x, data.target)
        else:
            data.first = find_task

    def start(self, resumed: Checkpoint | None) -> History:
        if resumed is None:
            return History()
        return History(**{name: tuple(values) for name, values in resumed.history.items()},
                       task=self.task if resumed.history["train_loss"] else None)

    def on_epoch(self, progress: Progress) -> None:
        state, history = progress.raw, progress.history
        model_state = state.model_state if self.stateful else None
        if self.stateful:
            history = attrs.evolve(history, model_state=model_state)
        if self.record:
            if isinstance(self.data, _Tensors):
                x, target = self.data.x, self.data.target
            else:
                x, target = (torch.cat(part) for part in zip(*self.seen, strict=True))
                self.seen = []
            on_test = None if self.test is None else evaluate(self.model, self.loss, state.params, *self.test,
                                                              state=model_state, task=self.task)
            history = history._append(evaluate(self.model, self.loss, state.params, x, target, state=model_state,
                                               task=self.task), on_test)
        progress.history = history


def _model_state_of(model: Any, params: Params, data: Any, model_state: State | None, compile: bool) -> State | None:
    """The model's state to start from: a stateful model's (checked), ``None`` for a plain model."""
    if isinstance(model, StatefulLayer):
        if compile:
            raise ValueError(f"fit: compile=True compiles a plain model's step; {model.name} carries state or "
                             "randomness")
        return _start_state(model, params, data.x if isinstance(data, _Tensors) else None, model_state)
    if model_state is not None:
        raise ValueError(f"fit: model_state goes with a StatefulLayer; {model.name} is a plain Layer, which has none")
    return None


def _data_parallel_start(model: Any, loss: Loss, optimizer: Any, lr: Any, params: Params, opt_state: Any,
                         model_state: Any, data: Any, test: Any, epochs: int, generator: Any, record_history: bool,
                         info: Any, compile: bool, capture: bool, check_finite: bool, checkpoint: Any,
                         checkpoint_every: Any, task: Any, size: int) -> Params:
    """Before a data-parallel run: every rank trains the same run (or every rank says where they differ), and
    rank 0's params, broadcast, are everyone's."""
    if not isinstance(data, _Tensors):
        raise ValueError("fit: data-parallel training takes (x, target) tensors, whose shuffle every process draws "
                         "alike; with an iterable of batches, write the loop with rf.data_parallel(step)")
    # First, before any collective that takes the ranks to agree (a broadcast of params of other shapes aborts
    # in gloo): every rank trains the same run, or every rank says where they differ.
    _check_same_run({
        **_run_settings(model, loss, optimizer, lr, params, opt_state, model_state, data.x, data.target, test,
                        epochs, data.batch_size, generator, record_history, info, data.per_epoch, compile,
                        drop_last=data.drop_last),
        "start": _start_shapes(params, opt_state, model_state),  # rank 0's params, broadcast, are everyone's
        "capture": capture, "check_finite": check_finite, "device": data.x.device.type,
        "checkpoint": None if checkpoint is None else {"path": os.fspath(checkpoint), "every": checkpoint_every,
                                                      "file": _file_digest(checkpoint)},
    }, data.x.device, size)
    if compile or capture:
        raise ValueError("fit: data-parallel training (torch.distributed with several processes) runs the step "
                         "as it is, without compile=True or capture=True (not yet)")
    if "reduction='sum'" in loss.name:
        raise ValueError(f"fit: data-parallel training weighs each process's loss by its share of the rows, "
                         f"which is right for a mean over rows; {loss.name} sums (use reduction='mean')")
    return broadcast_params(params)


def _resumed(model: Any, loss: Loss, optimizer: Any, lr: Any, params: Params, opt_state: Any, model_state: Any,
             data: Any, test: Any, epochs: int, generator: Any, record_history: bool, info: Any, compile: bool,
             checkpoint: Any, task: Any) -> tuple[Checkpoint | None, dict[str, Any]]:
    """``(the checkpoint to resume from or None, the run's settings)``, every check passed."""
    if not isinstance(data, _Tensors):
        raise ValueError("fit: checkpoint= resumes a run inside an epoch of (x, target) tensors, whose shuffle it "
                         "records; an iterable of batches cannot be taken up where it stopped. Save the state after "
                         "an epoch yourself (a hook's on_epoch: rf.save_state(progress.state, path))")
    check_writable(checkpoint, "fit: checkpoint")  # before any work: a path that cannot be written fails now

    def describe(total: int) -> dict[str, Any]:  # the run's settings, as if it were `total` epochs long
        settings = _run_settings(model, loss, optimizer, lr, params, opt_state, model_state, data.x, data.target,
                                 test, total, data.batch_size, generator, record_history, info, data.per_epoch,
                                 compile, checkpoint, data.drop_last)
        # What the history measures: a resumed run measures alike.
        return {**settings, "task": task if record_history else None}

    settings = describe(epochs)
    resumed = _resume(checkpoint, settings, describe)
    if resumed is not None:
        _check_resumed(checkpoint, resumed, optimizer, params, opt_state, model_state, data.rows, data.batch_size,
                       data.per_epoch, _recorded(record_history, task, test))
    return resumed, settings


def _step_and_state(model: Any, loss: Loss, optimizer: Any, lr: Any, params: Params, opt_state: Any,
                    model_state: Any, g: torch.Generator, resumed: Checkpoint | None, compile: bool, capture: bool,
                    rank: int, size: int, data: Any) -> tuple[Callable[..., Any], TrainState]:
    """The step the loop runs, chosen once (the transforms applied: compile, data-parallel, capture), and the
    :class:`TrainState` it starts from (the checkpoint's, when one is resumed)."""
    if resumed is not None:
        params, model_state = resumed.params, resumed.model_state
        g.set_state(resumed.generator_state)
    runner, rate = _optimizer("fit", optimizer, lr, params, opt_state, compile,
                              resumed=resumed.opt_state if resumed is not None else None)
    steps = resumed.steps if resumed is not None else 0
    state = TrainState(params=runner.params if runner is not None else params,
                       opt_state=runner if runner is not None else {}, model_state=model_state or {},
                       generator=g.get_state(), step=torch.tensor(steps, dtype=torch.int64))
    if compile:
        return _CompiledSGD(_compiled_sgd(model, loss), rate), state
    # The optimizer applied in place to the runner's private copies, or a step function at the step's rate.
    step = TrainStep(model, loss, _InPlace(runner) if runner is not None else _Rated(optimizer, rate, steps),
                     grad=value_and_grad(model, loss))
    if size > 1:
        from .distributed import _sharded

        step = _sharded(step, rank, size, "fit")
    if capture:
        from .graphs import capture as record  # imported on first use, as compile's module

        step = attrs.evolve(step, grad=record(step._grad))
    if isinstance(model, StatefulLayer):
        return (_short_batch_named(step, data) if isinstance(data, _Tensors) else step), state
    return (_Applied(step._grad, runner) if runner is not None else step), state


class _InPlace:
    """The optimizer of fit's step: ``optim.base._Running``, which updates private copies of the params and its
    state in place with the kernels of ``optimizer.step`` (so the same bits), without a new tree per step. The
    state's ``opt_state`` is the runner itself; :attr:`Progress.state` reads it out."""

    def __init__(self, runner: _Running) -> None:
        self.runner = runner

    def step(self, params: Params, grads: Params, opt_state: Any) -> tuple[Params, _Running]:
        return self.runner(grads), self.runner


class _Applied:
    """A plain model's step with an optimizer, as fit runs it: the gradient (the TrainStep's, transforms
    included), then the optimizer applied in place by the runner. The state it returns is the one passed in,
    whose params and opt_state (the runner) are live: no record, and no step count tensor, is made per step
    (about 6 µs of a 110 µs step at batch 10); :attr:`Progress.state` reads the state out, step count included."""

    def __init__(self, grad: Callable[..., tuple[Tensor, Params]], runner: _Running) -> None:
        self.grad, self.runner = grad, runner

    def __call__(self, state: TrainState, x: Tensor, target: Tensor) -> tuple[TrainState, dict[str, Tensor]]:
        value, grads = self.grad(state.params, x, target)
        self.runner(grads)
        return state, {"loss": value}


class _Rated:
    """A step function ``(params, grads, lr) -> params`` as the step's optimizer, at the rate of each step count."""

    def __init__(self, function: StepFunction, rate: Callable[[int], float], count: int) -> None:
        self.function, self.rate, self.count = function, rate, count

    def step(self, params: Params, grads: Params, opt_state: Tree) -> tuple[Params, Tree]:
        new = self.function(params, grads, self.rate(self.count))
        self.count += 1
        return new, opt_state


@attrs.frozen(eq=False)
class _CompiledSGD:
    """``compile=True``'s step: forward, backward and plain SGD as one ``torch.compile``'d function."""

    run: Callable[[Params, Tensor, Tensor, float], tuple[Tensor, Params]]
    rate: Callable[[int], float]

    def __call__(self, state: TrainState, x: Tensor, target: Tensor) -> tuple[TrainState, dict[str, Tensor]]:
        value, params = self.run(state.params, x, target, self.rate(int(state.step)))
        return attrs.evolve(state, params=params, step=state.step + 1), {"loss": value}


def _short_batch_named(step: Callable[..., Any], data: _Tensors) -> Callable[..., Any]:
    """``step``, with an error at an epoch's short last batch (batch norm cannot take one row) saying so."""

    def run(state: TrainState, x: Tensor, target: Tensor) -> tuple[TrainState, dict[str, Tensor]]:
        try:
            return step(state, x, target)
        except ValueError as error:
            if x.shape[0] == data.batch_size:
                raise
            raise ValueError(f"fit: the last batch of each epoch holds {x.shape[0]} row(s) ({data.x.shape[0]} rows in "
                             f"batches of {data.batch_size}): {error}") from None

    return run


def _early(patience: int | None, record_history: bool, checkpoint: Any) -> list[EarlyStopping]:
    if patience is None:
        return []
    if not record_history:
        raise ValueError("fit: patience watches the loss the history records after each epoch; it needs "
                         "record_history=True")
    if checkpoint is not None:
        raise ValueError("fit: patience keeps the best epoch's state in memory, which a checkpoint does not hold: a "
                         "resumed run would lose it. Use one or the other")
    return [early_stopping(patience)]


def _checkpoints(path: Any, every: int | None, epochs: int, data: Any, settings: Any, finite: _Finite | None,
                 rank: int, optimizer: Any, model: Any) -> _Checkpoints | None:
    if path is None:
        return None
    every = data.per_epoch if every is None else every
    _check_count("fit", "checkpoint_every", every, 1)
    keeps_opt_state = isinstance(optimizer, Optimizer) or optimizer is sgd_step
    return _Checkpoints(path, every, epochs, data.rows, settings, finite, rank, keeps_opt_state,
                        isinstance(model, StatefulLayer))


def _result(progress: Progress, hooks: list[Any], generator: Any, optimizer: Any, model: Any) -> tuple[Params,
                                                                                                       History]:
    """What fit returns: the final state's params (or the one a hook's ``on_end`` chose), and the history with
    the optimizer's and the model's state."""
    chosen = [hook.on_end(progress) for hook in hooks if hasattr(hook, "on_end")]
    final = next((state for state in reversed(chosen) if state is not None), None) or progress.state
    if isinstance(generator, torch.Generator):  # advanced, as every torch sampling function advances its generator
        generator.set_state(progress.raw.generator)
    history = attrs.evolve(progress.history, opt_state=final.opt_state if isinstance(optimizer, Optimizer) else None,
                           model_state=final.model_state if isinstance(model, StatefulLayer) else None)
    ran = progress.steps > 0 or isinstance(progress.raw.opt_state, _Running)
    return (final.params if ran else _copy(final.params)), history


def _check_same_run(settings: dict[str, Any], device: torch.device, size: int) -> None:
    """Every rank of a data-parallel run trains the same run: each rank's settings (those a checkpoint records,
    and how it checkpoints) are gathered, and every rank raises the same error naming the first that differs."""
    from .distributed import _disagreement

    found = _disagreement("fit", settings, device)
    if found is not None:
        rank, path, theirs, first = found
        raise ValueError(f"fit: the {size} processes of a data-parallel run must train the same run, but rank "
                         f"{rank} differs from rank 0 in {path}: {theirs} on rank {rank}, {first} on rank 0 (start "
                         "every process with the same arguments: data, seed, model, loss, optimizer, rate, ...)")


def _start_shapes(params: Params, opt_state: Tree | None, model_state: Any) -> dict[str, Any]:
    """What must agree of the start of a data-parallel run: the params' shapes and dtypes (their values are rank
    0's, which the broadcast gives every rank) and the optimizer's and model's states, which are not broadcast."""
    from .checkpoint import digest
    from .tree import tree_flatten

    return {"params": {path: f"{leaf.dtype} {tuple(leaf.shape)}" if isinstance(leaf, Tensor) else repr(leaf)
                       for path, leaf in tree_flatten(params).items()},
            "states": digest(opt_state, model_state)}


def _file_digest(path: str | os.PathLike[str]) -> str | None:
    """A fingerprint of the file's bytes (``None`` when there is none): every rank must resume from the same
    checkpoint, which ranks on machines that do not share the file would not."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"unreadable: {error.strerror or error}"


def _check_capture(model: Any, data: Any, params: Params, compile: bool) -> None:
    if compile:
        raise ValueError("fit: compile=True and capture=True are two ways to run the step; choose one")
    if isinstance(model, StatefulLayer):
        raise ValueError(f"fit: capture=True records a plain model's step as a CUDA graph; {model.name} carries state "
                         "or randomness, whose step takes a generator and a state that the graph does not carry yet "
                         "(and dropout draws its masks on the CPU)")
    if not isinstance(data, _Tensors):  # an iterable's batches: the graph itself refuses one off the device
        return
    devices = {str(data.x.device), str(data.target.device), *(str(leaf.device) for leaf in tree_leaves(params))}
    if len(devices) > 1 or not next(iter(devices)).startswith("cuda"):
        raise ValueError(f"fit: capture=True records each step as a CUDA graph, so x, target and the params must be "
                         f"on one CUDA device; they are on {', '.join(sorted(devices))}")


def _detached(params: Params) -> Params:
    """The params detached from any autograd graph (a view each, no copy): params that require grad would
    otherwise grow a graph through every update, which is never freed, and hand back results with a grad_fn."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, params)


def _run_settings(model: Any, loss: Loss, optimizer: Any, lr: Any, params: Params, opt_state: Tree | None,
                  model_state: Any, x: Tensor, target: Tensor, test: Any, epochs: int, batch_size: int,
                  generator: Any, record_history: bool, info: Any, per_epoch: int,
                  compile: bool = False, path: Any = None, drop_last: bool = False) -> dict[str, Any]:
    """What a checkpoint (at ``path``) records of the run, and a resumed run must match, as JSON data."""
    from .checkpoint import describe_optimizer, describe_rate, digest, unidentified

    reason = unidentified(optimizer) if info is None and path is not None else None  # a checkpoint must know it
    if reason:
        inner = getattr(optimizer, "func", optimizer)  # a functools.partial's function
        name = getattr(inner, "__qualname__", None) or type(optimizer).__name__
        values = ", ".join(f"'{free}': ..." for free in getattr(getattr(optimizer, "__code__", None), "co_freevars",
                                                                ())) or "'values': ..."
        raise ValueError(f"fit: checkpoint={str(path)!r} knows a run by its settings, and the step function {name} "
                         f"{reason}: "
                         "a checkpoint of it would be taken up by another that differs only there (as one of "
                         "make(1.0) by make(3.0)). Pass checkpoint_info naming it and those values (e.g. "
                         f"checkpoint_info={{'step': '{name}', {values}}}), which a resumed run must match; or use "
                         "an rf.Optimizer, or a module-level function without a closure")
    settings = {  # the plainest first, so that a difference is named by the plainest setting that shows it
        "info": info,
        "model": model.name,
        "loss": loss.name,
        "epochs": epochs,
        "batch_size": batch_size,
        "data": f"{x.shape[0]} rows, {digest(x, target)}",
        "test": digest(*test) if test is not None else None,
        "start": digest(params, opt_state, model_state),
        "generator": generator if isinstance(generator, int) else digest(generator.get_state()),
        "record_history": record_history,
        "compile": compile,
        "optimizer": describe_optimizer(optimizer, epochs * per_epoch),
        "lr": describe_rate(lr, epochs * per_epoch),
        **({"drop_last": True} if drop_last else {}),  # a key only when set: older checkpoints resume as they were
    }
    try:  # before any work: the settings go into every checkpoint as JSON
        return json.loads(json.dumps(settings, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"fit: checkpoint_info must be JSON data (dicts, lists, strings, numbers), which it "
                         f"is not: {error} (it goes into the checkpoint {str(path)!r})") from None


def _check_resumed(path: Any, saved: Checkpoint, optimizer: Any, params: Params, opt_state: Tree | None,
                   model_state: State | None, n: int, batch_size: int, per_epoch: int, recorded: set[str]) -> None:
    """The checkpoint's record agrees with itself and with the run that resumes it: its position and step count
    with the data and batches, its trees with the model's and the optimizer's (an optimizer that keeps a state has
    it there, its step counts those of the steps taken), its history with what the run records (``recorded``: the
    names of the history's lists that are not empty after an epoch). A checkpoint edited by hand and signed anew
    would otherwise resume into another run."""

    def refuse(what: str) -> None:
        raise ValueError(f"fit: the checkpoint {str(path)!r} {what}: it cannot be resumed; remove it to start afresh")

    total = saved.settings.get("epochs")
    if isinstance(total, int) and _ahead_of(saved, total):
        refuse(f"{_ahead_of(saved, total)}, more than the {total} epochs of its run")
    if saved.position >= n or saved.position % batch_size:
        refuse(f"records a position of {saved.position} rows into an epoch of {n} rows in batches of {batch_size}")
    steps = saved.epochs_done * per_epoch + saved.position // batch_size
    if saved.steps != steps:
        refuse(f"records {saved.steps} steps, where {saved.epochs_done} epochs of {per_epoch} steps and "
               f"{saved.position} rows in batches of {batch_size} are {steps}")
    found = tree_difference(params, saved.params, names=("the model's params", "the checkpoint's"), leaves=True)
    if found:
        refuse(f"holds other params than the model's ({found})")
    if model_state is not None:
        found = tree_difference(model_state, saved.model_state if saved.model_state is not None else {},
                                names=("the model's state", "the checkpoint's"), leaves=True)
        if saved.model_state is None or found:
            refuse(f"holds {'no' if saved.model_state is None else 'another'} model state than the model keeps "
                   f"(batch norm's running statistics){f': {found}' if found else ''}")
        for where, leaf in tree_flatten(saved.model_state).items():
            if where.endswith("num_batches_tracked") and int(leaf) < 0:
                refuse(f"records {int(leaf)} batches at {where}, fewer than none")
    if isinstance(optimizer, Optimizer) or optimizer is sgd_step:
        rule = optimizer if isinstance(optimizer, Optimizer) else sgd(0.0)
        start = opt_state if opt_state is not None else rule.init(params)
        if saved.opt_state is None and tree_leaves(start):
            refuse(f"holds no optimizer state, but {rule.name} keeps one (its step count and buffers)")
        found = tree_difference(start, saved.opt_state or {}, names=(f"{rule.name}'s state", "the checkpoint's"),
                                leaves=True)
        if found:
            refuse(f"holds another optimizer state than {rule.name} keeps ({found})")
        counts = tree_flatten(saved.opt_state or {})
        for where, first in tree_flatten(start).items():
            if where.split(".")[-1] == "count" and int(counts[where]) != int(first) + saved.steps:
                refuse(f"records {int(counts[where])} optimizer steps at {where}, where {saved.steps} steps were "
                       f"taken from {int(first)}")
    for name, values in saved.history.items():
        if bool(values) != (name in recorded and saved.epochs_done > 0):
            refuse(f"holds {len(values)} value(s) of {name}, which the run "
                   f"{'records once an epoch' if name in recorded else 'does not record'}")


def _recorded(record_history: bool, task: str | None, test: Any) -> set[str]:
    """The history's lists that fill once an epoch, as :meth:`History._append` fills them for ``task``."""
    if not record_history:
        return set()
    metrics = ("loss", "rmse", "r2") if task == "regression" else ("loss", "accuracy")
    return {f"{split}_{metric}" for split in ("train", *(("test",) if test is not None else ())) for metric in metrics}


def _ahead_of(saved: Checkpoint, epochs: int) -> str | None:
    """What ``saved`` has done beyond a run of ``epochs`` epochs, in words (``"has 3 epochs and 12 rows of the next
    done"``), or ``None`` when such a run can resume it: a checkpoint inside epoch ``epochs + 1`` is past its end."""
    if saved.epochs_done < epochs or (saved.epochs_done == epochs and not saved.position):
        return None
    rows = f" and {saved.position} rows of the next" if saved.position else ""
    return f"has {saved.epochs_done} epochs{rows} done"


def _resume(path: Any, settings: dict[str, Any], describe: Callable[[int], dict[str, Any]]) -> Checkpoint | None:
    """The checkpoint at ``path`` to resume from, ``None`` when there is none; refused if it records another run.

    A run of another length is the same run extended (or cut short) when everything else matches, the
    optimizer's rate at every step the two lengths share included (``describe(total)`` describes this run as
    if it were ``total`` epochs long): a constant rate, or a schedule that does not depend on the total.
    """
    from .checkpoint import difference, read_checkpoint

    if not os.path.exists(path):
        return None
    saved = read_checkpoint(path)
    shown, epochs = repr(str(path)), settings["epochs"]
    found = difference(saved.settings, settings)
    if found is None:
        return saved
    total = saved.settings.get("epochs")
    if isinstance(total, int) and not isinstance(total, bool) and 0 <= total != epochs:
        found = difference(saved.settings, describe(total))
        if found is None:
            ahead = _ahead_of(saved, epochs)
            if ahead:
                raise ValueError(f"fit: the checkpoint {shown} {ahead}, more than epochs={epochs}; resume it with "
                                 f"epochs ≥ {saved.epochs_done + (saved.position > 0)}")
            return saved
        if found.startswith(("optimizer", "lr")):
            raise ValueError(f"fit: the checkpoint {shown} records a run of {total} epochs, which cannot go on to "
                             f"{epochs}: the optimizer or its rate would differ over the steps it has taken "
                             f"({found}). A schedule tied to the run's length (a linear or cosine decay to its "
                             "last step) changes with it; only a run with a constant rate, or a schedule that does "
                             f"not depend on the total, can be extended. Resume it with epochs={total}, or remove "
                             "it to start afresh")
    raise ValueError(f"fit: the checkpoint {shown} records another run ({found}); resume with the "
                     "settings it was written with, or remove it to start afresh")


def _optimizer(
    who: str, optimizer: Any, lr: Any, params: Params, opt_state: Tree | None, compile: bool = False,
    resumed: Tree | None = None,
) -> tuple[_Running | None, Callable[[int], float]]:
    """``(runner, rate)``: the optimizer run in place on private copies, or ``None`` and the rate of step
    ``count`` for a step function (``sgd_step`` compiled, or a user's own)."""
    if isinstance(optimizer, Optimizer):
        if lr is not None:
            raise ValueError(f"{who}: {optimizer.name} carries its own lr; leave lr out (or pass lr=None)")
        if compile:
            raise ValueError(f"{who}: compile=True runs plain SGD inside the compiled step; it takes no other "
                             "optimizer")
        return _Running(optimizer, params, resumed if resumed is not None else opt_state, who), lambda count: 0.0
    if any(optimizer is factory for factory in _FACTORIES):
        raise TypeError(f"{who}: optimizer rf.{optimizer.__name__} makes an optimizer: call it, e.g. "
                        f"optimizer=rf.{optimizer.__name__}(...) with its rate (a step function passed here takes "
                        "(params, grads, lr))")
    if not callable(optimizer):
        raise TypeError(f"{who}: optimizer must be an rf.Optimizer or a step function (params, grads, lr) -> params, "
                        f"got {type(optimizer).__name__}")
    if lr is None:
        raise ValueError(f"{who}: lr is required with a step function such as sgd_step "
                         "(or pass optimizer=rf.sgd(lr), which carries its own)")
    if opt_state is not None:
        raise ValueError(f"{who}: opt_state goes with an rf.Optimizer; a step function keeps no state")
    schedule = lr if callable(lr) else _constant(lr, who)
    if optimizer is sgd_step and not compile:  # the same kernel, run in place by the one optimizer path
        return _Running(sgd(schedule), params, resumed, who), lambda count: 0.0
    if compile and optimizer is not sgd_step:
        raise ValueError(f"{who}: compile=True runs plain SGD inside the compiled step; it takes no other optimizer")
    return None, lambda count: _rate(schedule, count, who)


def _start_state(model: StatefulLayer, params: Params, x: Tensor, state: State | None) -> State:
    """The state to train from: ``state``, or ``model.init_state()`` in the dtype of the params (else of ``x``)."""
    if state is not None:
        return _copy(state)  # the caller's tensors are never handed back as the result
    floats = [leaf for leaf in tree_leaves(params) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
    dtype = floats[0].dtype if floats else x.dtype if isinstance(x, Tensor) and x.is_floating_point() else None
    return model.init_state(dtype=dtype or torch.float32)


def _constant(lr: Any, who: str) -> Callable[[int], float]:
    """A checked constant rate, as a schedule."""
    value = _check_lr(lr, who)
    return lambda count: value


def _copy(tree: Tree) -> Tree:
    return tree_map(torch.clone, tree)


def _compiled_sgd(model: Layer, loss: Loss) -> Callable[[Params, Tensor, Tensor, float], tuple[Tensor, Params]]:
    """The compiled step with the rate passed as a tensor, so that a schedule never recompiles it."""
    from .compiled import compiled_step

    step = compiled_step(model, loss)

    def run(params: Params, x: Tensor, target: Tensor, lr: float) -> tuple[Tensor, Params]:
        return step(params, x, target, torch.tensor(lr, dtype=x.dtype))

    return run
