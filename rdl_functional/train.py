"""Training: minibatch gradient descent over a data set, and the metrics it records."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor

from ._random import as_generator
from ._runs import _data_parallel_start, _resumed
from .distributed import world
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
from .loop import (
    StepFunction,
    _batches_of,
    _check_capture,
    _check_count,
    _check_rows,
    _copy,
    _detached,
    _Iterable,
    _model_state_of,
    _step_and_state,
    _Tensors,
)
from .losses import Loss, check_loss
from .metrics import Evaluation, check_fits, check_task, infer_task, measure, predictions, task_of_outputs
from .optim import Optimizer, Schedule, sgd_step
from .optim.base import _Running
from .stateful import State, StatefulLayer
from .tree import Tree

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = ["History", "NonFiniteLoss", "accuracy", "evaluate", "fit", "predict"]


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
    the first two rows of the training and the test set (two: batch norm without running statistics normalizes over
    the rows it is given, evaluating too), and the loss on the test set's (the training set's meets it at the first
    step), so that a model, target or test set that the loss or the metrics cannot take fails now, never after an
    epoch of training. ``rows``: 2 for a stack of models, whose rows are ``x[:, i]``."""
    # (One row of an x whose rows are numbers, 1-D: a layer then says it reads one example of one feature.)
    first = (slice(None),) * (rows - 1) + (slice(0, 2 if x.dim() > rows else 1),)
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
                raise type(error)(f"{who}: test: {error} (on the test set's first rows)") from None
    return task


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
    before the loop: ``compile=True`` runs :func:`~rdl_functional.compiled` of the step,
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
        compile: run each step through :func:`~rdl_functional.compiled` of
            ``rf.train_step(model, loss, optimizer)`` (inductor; a plain model,
            an ``rf.Optimizer`` or ``sgd_step`` with ``lr``). The first step
            compiles, which takes tens of seconds on a CPU; the compiled step is
            kept for the next fit of the same model, loss and optimizer (any
            ``lr`` for ``sgd_step``: rates are inputs of the graph). The results
            equal eager training to float rounding, not bit for bit.
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
    if "reduction='none'" in loss.name:  # as the loss names its options; a value per element has no one gradient
        raise ValueError(f"fit: {loss.name} gives one value per element, and fit trains on one number a batch: "
                         "use reduction='mean' (or 'sum'), or a loop of rf.value_and_grad for a weighted sum of "
                         "your own")
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
             _Callback(callback) if callback is not None else None, *_user_hooks(on_step, hooks, checkpoint)]
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


def _user_hooks(on_step: Any, hooks: Any, checkpoint: Any) -> list[Any]:
    """``on_step`` as a hook, then ``hooks``, each checked to be a hook (an object with some of on_step, on_epoch
    and on_end), so that a misspelt method fails now rather than never being called; early stopping is refused
    with a checkpoint, as ``patience`` is (a resumed run would lose the best state it holds in memory)."""
    if on_step is not None and not callable(on_step):
        raise TypeError(f"fit: on_step must be a function on_step(progress), got {type(on_step).__name__}")
    if isinstance(hooks, (str, bytes)) or not isinstance(hooks, Iterable):
        raise TypeError(f"fit: hooks must be a list of hooks, got {type(hooks).__name__}")
    hooks = list(hooks)
    for index, hook in enumerate(hooks):
        if not any(callable(getattr(hook, name, None)) for name in ("on_step", "on_epoch", "on_end")):
            raise TypeError(f"fit: hooks[{index}] ({type(hook).__name__}) has none of the methods on_step(progress), "
                            "on_epoch(progress), on_end(progress) that make a hook (rdl_functional.hooks has the "
                            "protocol)")
        if checkpoint is not None and isinstance(hook, EarlyStopping):
            raise ValueError(f"fit: hooks[{index}] (early stopping) keeps the best epoch's state in memory, which a "
                             "checkpoint does not hold: a resumed run would lose it. Use one or the other")
    return [*([_OnStep(on_step)] if on_step is not None else []), *hooks]


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


